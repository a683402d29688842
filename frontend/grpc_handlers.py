"""A gRPC method of ours as grpc.aio serves it: every TFBrokerError leaves with the gRPC code of
its class (tfbroker/wire/errors.py) and its text; the Pipeline has already turned anything else
into Internal, and a bug outside it is answered the same way."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, AsyncIterator, Awaitable, Callable

import grpc

from tfbroker.wire.errors import Internal, TFBrokerError

log = logging.getLogger("tfbroker.grpc")


def status_code(error: TFBrokerError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, error.grpc_code, grpc.StatusCode.UNKNOWN)


def unary(method: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]], request_type: Any) -> Any:
    """One unary RPC: a TFBrokerError to its gRPC code and text."""

    async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(request, context)
        except TFBrokerError as exc:
            await context.abort(status_code(exc), exc.message)
        except Exception as exc:  # noqa: BLE001 - a bug outside the pipeline answers this RPC, not the process
            if isinstance(exc, (grpc.aio.AbortError, asyncio.CancelledError)):
                raise
            log.exception("gRPC call failed")
            await context.abort(grpc.StatusCode.INTERNAL, Internal(f"frontend error: {type(exc).__name__}: {exc}")
                                .message)
        raise AssertionError("unreachable: abort raises")

    return grpc.unary_unary_rpc_method_handler(handle, request_deserializer=request_type.FromString,
                                               response_serializer=_serialize)


def stream(method: Callable[[AsyncIterator[Any], grpc.aio.ServicerContext], AsyncIterator[Any]],
           request_type: Any) -> Any:
    """One bidirectional stream; ``method`` answers each request in turn (its errors in its answers)."""
    return grpc.stream_stream_rpc_method_handler(method, request_deserializer=request_type.FromString,
                                                 response_serializer=_serialize)


def _serialize(message: Any) -> bytes:
    return message.SerializeToString()  # type: ignore[no-any-return]
