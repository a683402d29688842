"""The HTTP frontend: TF Serving's REST API on ASGI, ``frontend.app:app``.

Runs under uvicorn or gunicorn (``gunicorn -k uvicorn_worker.UvicornWorker frontend.app:app``)
and never imports TensorFlow: it parses JSON into arrays and passes them to the broker
through tfbroker.client. Settings come from the environment, since gunicorn owns the
command line: TFBROKER_ADDRESS (the broker's frontend socket), TFBROKER_TIMEOUT_MS (the
request deadline, TF Serving's --rest_api_timeout_in_ms), TFBROKER_LIMITS (RequestLimits as
flags), TFBROKER_GRPC (GrpcOptions as flags: TF Serving's gRPC API on the same event loop,
frontend/grpc_api.py; unset, none), TFBROKER_STATUS_PAGE ("1": the status page at /status
and /status.json, frontend/status_page.py) and TFBROKER_FRONTEND_INDEX (N in the process
title ``tfbroker: frontend:N``).

Everything under ``/v1/`` is served here on raw ASGI (frontend/routes.py matches the paths
as TF Serving does); Starlette serves the rest (404) and the lifespan. Every answer, errors
included, is JSON: ``{"error": "…"}`` with the status of the error's class
(tfbroker/wire/errors.py); a 503 carries ``Retry-After``. A caller may ask for a shorter deadline
than TFBROKER_TIMEOUT_MS with the header ``X-Request-Timeout-Ms``. A client that
disconnects cancels its request: the broker drops it if it has not been dispatched.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import time
from typing import AsyncIterator

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from tfbroker.runtime.settings import (DEFAULT_TIMEOUT_MS, FRONTEND_INDEX_ENV, GRPC_ENV, LIMITS_ENV, STATUS_PAGE_ENV,
                                       TIMEOUT_ENV, GrpcOptions, RequestLimits)
from tfbroker.wire.errors import Internal, InvalidArgument, NotFound, PayloadTooLarge, TFBrokerError, Unavailable
from tfbroker.runtime.flags import parse_flags
from tfbroker.runtime.process import set_title
from frontend import routes, status_page
from frontend.disconnects import DisconnectWatch
from tfbroker.async_client import AsyncClient
from frontend.tf_example import format_results, parse_examples
from frontend.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from frontend.metrics import Metrics
from frontend.metrics import from_env as metrics_from_env
from frontend.json_tensor import JsonTypeError, format_predictions, parse_predict_body

log = logging.getLogger("tfbroker.frontend")

RETRY_AFTER_S = "1"  # what a 503 (queue full, model loading, worker restarting) tells callers
TIMEOUT_HEADER = b"x-request-timeout-ms"
DISCONNECT_WATCH_AFTER_S = 0.05
JSON = (b"content-type", b"application/json")
# TF Serving's answer to a CORS preflight.
CORS = [(b"access-control-allow-origin", b"*"), (b"access-control-allow-methods", b"POST, GET"),
        (b"access-control-allow-headers", b"Content-Type")]

Answer = tuple[int, bytes, list[tuple[bytes, bytes]]]  # status, JSON body, extra headers


def error_answer(error: TFBrokerError) -> Answer:
    headers = [(b"retry-after", RETRY_AFTER_S.encode())] if error.http_status == 503 else []
    return error.http_status, orjson.dumps({"error": error.message}), headers


class RestApi:
    """Everything under /v1/: predict on the hot path, status and metadata, and TF Serving's
    errors for anything else; other paths go to ``app`` (Starlette: 404 and the lifespan)."""

    def __init__(self, app: ASGIApp, client: AsyncClient, timeout_s: float, limits: RequestLimits,
                 metrics: Metrics | None = None) -> None:
        self.app = app
        self.client = client
        self.timeout_s = timeout_s
        self.limits = limits
        self.metrics = metrics
        # The status page: the broker's frontends serve it unless --enable_status_page=false.
        self.status_page = metrics is not None and os.environ.get(STATUS_PAGE_ENV) == "1"
        self.waiting = 0  # predictions waiting on the broker (max_concurrent_predictions)
        self.disconnects = DisconnectWatch(DISCONNECT_WATCH_AFTER_S)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not routes.is_api_path(scope["path"]):
            if self.metrics is not None and scope["type"] == "http" and scope["path"] == self.metrics.path:
                await self.scrape(send)
                return
            if self.status_page and scope["type"] == "http" and scope["path"] in (status_page.PATH,
                                                                                   status_page.JSON_PATH):
                await self.show_status(scope, send)
                return
            await self.app(scope, receive, send)
            return
        raw = scope.get("raw_path")
        path = raw.decode("latin-1").partition("?")[0] if raw else scope["path"]
        method = scope["method"]
        started = time.monotonic()
        call = None
        try:
            if method == "OPTIONS":
                answer = cors_preflight(scope)
            else:
                call = routes.parse(method, path)
                if call.verb == "predict":
                    status = await self.predict(call, scope, receive, send)
                    if self.metrics is not None:
                        self.metrics.observe(call.model, call.verb, status, started, busy=self.waiting > 0)
                    return
                answer = await self.answer(call, scope, receive)
        except TFBrokerError as exc:
            answer = error_answer(exc)
        except Exception as exc:  # noqa: BLE001 - a bug answers this request with JSON, not the process
            log.exception("%s %s failed", method, path)
            answer = error_answer(Internal(f"frontend error: {type(exc).__name__}: {exc}"))
        await _respond(send, *answer)
        if self.metrics is not None and call is not None:
            self.metrics.observe(call.model, call.verb, answer[0], started)

    async def scrape(self, send: Send) -> None:
        """The metrics page: every frontend's requests, and the broker's figures."""
        assert self.metrics is not None
        try:
            stats = await self.client.stats_reply()
        except TFBrokerError:
            stats = None  # the broker is away: the frontends' own figures still answer
        content = self.metrics.render(stats)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", METRICS_CONTENT_TYPE), (b"content-length", str(len(content)).encode())]})
        await send({"type": "http.response.body", "body": content})

    async def show_status(self, scope: Scope, send: Send) -> None:
        """The status page (frontend/status_page.py), or the figures it polls."""
        assert self.metrics is not None
        if scope["path"] == status_page.PATH:
            content, kind = status_page.PAGE, b"text/html; charset=utf-8"
        else:
            try:
                stats = await self.client.stats_reply()
            except TFBrokerError:
                stats = None  # the page says the broker does not answer
            content, kind = orjson.dumps(status_page.status_json(stats, self.metrics)), b"application/json"
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", kind), (b"content-length", str(len(content)).encode()),
                                (b"cache-control", b"no-store")]})
        await send({"type": "http.response.body", "body": content})

    async def answer(self, call: routes.RestCall, scope: Scope, receive: Receive) -> Answer:
        if call.verb in ("classify", "regress"):
            examples, signature = parse_examples(
                await _read_body(scope, receive, self.limits.max_request_body_bytes), call.verb)
            run = self.client.classify if call.verb == "classify" else self.client.regress
            result = await run(call.model, examples, version=call.version, label=call.label,
                               signature_name=signature, timeout_s=_timeout_s(scope["headers"], self.timeout_s))
            return (200, format_results(call.verb, result.outputs, len(examples)),
                    [(b"x-model-version", str(result.version).encode())])
        if call.verb == "metadata":
            reply = await self.client.metadata(call.model, version=call.version, label=call.label)
            body = {"model_spec": {"name": call.model, "signature_name": "", "version": str(reply["version"])},
                    "metadata": {"signature_def": reply["signature_def"]}}
        else:
            status = await self.client.status(call.model, version=call.version, label=call.label)
            body = {"model_version_status": status["model_version_status"]}
        return 200, orjson.dumps(body), []

    def direct_predict_call(self, path: str) -> routes.RestCall | None:
        """The predict call ``path`` makes, when the HTTP protocol may answer it itself
        (frontend/http_protocol.py); None for any other path, which then comes through ASGI
        (errors included)."""
        if not routes.is_api_path(path):
            return None
        try:
            call = routes.parse("POST", path)
        except TFBrokerError:
            return None
        return call if call.verb == "predict" else None

    async def direct_predict(self, call: routes.RestCall, headers: list[tuple[bytes, bytes]], body: bytes) -> Answer:
        """predict for a request the HTTP protocol has read whole, with the checks, answer
        and metrics of the ASGI path; the protocol cancels it when its client goes away
        (then the broker drops the request, as over ASGI)."""
        started = time.monotonic()
        status = 499  # unless answered: cancelled, the client is gone
        try:
            try:
                timeout_s = _timeout_s(headers, self.timeout_s)
                self.check_capacity()
            except TFBrokerError as exc:
                answer = error_answer(exc)
            else:
                self.waiting += 1
                try:
                    answer = await self.run_predict(body, call, timeout_s)
                finally:
                    self.waiting -= 1
            status = answer[0]
            return status, answer[1], _closing_headers(answer[2])
        finally:
            if self.metrics is not None:
                self.metrics.observe(call.model, call.verb, status, started, busy=self.waiting > 0)

    async def predict(self, call: routes.RestCall, scope: Scope, receive: Receive, send: Send) -> int:
        """predict through ASGI, for the requests the HTTP protocol does not answer itself
        (direct_predict): no routing table, middleware, Request or Response objects (a third
        of a frontend's CPU per request, measured with py-spy under bench). Returns the HTTP
        status it answered (499 when the client went away)."""
        body = await _read_body(scope, receive, self.limits.max_request_body_bytes)
        timeout_s = _timeout_s(scope["headers"], self.timeout_s)
        self.check_capacity()
        # A request still waiting after DISCONNECT_WATCH_AFTER_S starts watching for its client
        # going away, and is cancelled (taken out of the broker's queue) when it does.
        task = asyncio.current_task()
        assert task is not None  # (ASGI runs every request in a task)
        self.disconnects.add(task, receive, asyncio.get_running_loop())
        self.waiting += 1
        try:
            answer = await self.run_predict(body, call, timeout_s)
        except asyncio.CancelledError:
            if self.disconnects.done(task):
                return 499  # the client is gone: nobody to answer
            raise
        finally:
            self.waiting -= 1
            self.disconnects.done(task)
        await _respond(send, *answer)
        return answer[0]

    async def name_dtype(self, error: JsonTypeError, call: routes.RestCall, body: bytes) -> TFBrokerError:
        """The type error with the input's dtype as TensorFlow names it (``float``), from the
        model's metadata: one broker call, on this error path only."""
        try:
            metadata = await self.client.metadata(call.model, version=call.version, label=call.label)
            signature_name = orjson.loads(body).get("signature_name") or "serving_default"
            inputs = metadata["signature_def"]["signature_def"][signature_name]["inputs"]
            info = inputs[error.name] if error.name else next(iter(inputs.values()))
            return error.with_dtype(str(info["dtype"]).removeprefix("DT_").lower())
        except (TFBrokerError, KeyError, StopIteration, ValueError):
            return error  # the model's own error will say more; keep TF Serving's text without the dtype

    def check_capacity(self) -> None:
        """Overload: refuse before spending anything on the request, so the admitted ones keep
        the CPU and their latency stays bounded."""
        if self.waiting >= self.limits.max_concurrent_predictions:
            raise Unavailable(f"this frontend has {self.waiting} predictions waiting, its limit; retry later")

    async def run_predict(self, body: bytes, call: routes.RestCall, timeout_s: float) -> Answer:
        try:
            try:
                inputs, signature, row_format = parse_predict_body(body, self.limits)
            except JsonTypeError as exc:
                raise await self.name_dtype(exc, call, body) from None
            prediction = await self.client.predict(call.model, inputs, version=call.version, label=call.label,
                                                   signature_name=signature, timeout_s=timeout_s)
            return (200, format_predictions(prediction.outputs, row_format),
                    [(b"x-model-version", str(prediction.version).encode())])
        except TFBrokerError as exc:
            return error_answer(exc)
        except Exception as exc:  # noqa: BLE001 - a bug answers this request with JSON, not the process
            log.exception("predict failed")
            return error_answer(Internal(f"frontend error: {type(exc).__name__}: {exc}"))


# Set while this frontend shuts down (frontend/uvicorn_worker.py): every answer then closes its
# connection, so a proxy stops reusing it before the frontend goes, instead of meeting a reset.
closing = [False]
CONNECTION_CLOSE = (b"connection", b"close")


def _closing_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return [*headers, CONNECTION_CLOSE] if closing[0] else headers


async def _respond(send: Send, status: int, content: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [JSON, (b"content-length", str(len(content)).encode()), *_closing_headers(headers)]})
    await send({"type": "http.response.body", "body": content})


def cors_preflight(scope: Scope) -> Answer:
    """TF Serving's answer to OPTIONS: 200 with its CORS headers for a browser's preflight
    (an Origin of http:// or https://), 400 without one."""
    for name, value in scope["headers"]:
        if name == b"origin" and value.lower().startswith((b"http://", b"https://")):
            return 200, b"", CORS
    return error_answer(InvalidArgument("Origin header is missing in CORS preflight"))


def check_content_length(value: bytes | str | None, limit: int) -> None:
    """413 before the body is read when its announced length exceeds ``limit``."""
    if value is not None and value.isdigit() and int(value) > limit:
        raise PayloadTooLarge(f"the request body ({int(value)} bytes) exceeds the limit of {limit} bytes")


def check_body_size(size: int, limit: int) -> None:
    if size > limit:
        raise PayloadTooLarge(f"the request body exceeds the limit of {limit} bytes")


def timeout_from_header(value: bytes | str | None, default_s: float) -> float:
    """The deadline: the server's, or less when the caller asks (X-Request-Timeout-Ms)."""
    if value is None:
        return default_s
    if not value.isdigit() or int(value) < 1:
        shown = value.decode(errors="replace") if isinstance(value, bytes) else value
        raise InvalidArgument(f"X-Request-Timeout-Ms must be a positive integer, got {shown!r}")
    return min(default_s, int(value) / 1000.0)


async def _read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The request body, refused (413) as soon as it is known to exceed ``limit`` bytes."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            check_content_length(value, limit)
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise InvalidArgument("the client went away before sending the whole request")
        chunk = message.get("body", b"")
        size += len(chunk)
        check_body_size(size, limit)
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


def _timeout_s(headers: list[tuple[bytes, bytes]], default_s: float) -> float:
    for name, value in headers:
        if name == TIMEOUT_HEADER:
            return timeout_from_header(value, default_s)
    return default_s


async def not_found(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 404
    error = NotFound(f"{request.method} {request.url.path} is not part of the API (it is under /v1/)")
    return Response(orjson.dumps({"error": error.message}), status_code=status, media_type="application/json")


async def server_error(request: Request, exc: Exception) -> Response:
    log.error("request %s %s failed", request.method, request.url.path, exc_info=exc)
    status, content, _ = error_answer(Internal(f"frontend error: {type(exc).__name__}: {exc}"))
    return Response(content, status_code=status, media_type="application/json")


def limits_from_env() -> RequestLimits:
    text = os.environ.get(LIMITS_ENV, "")
    return parse_flags(RequestLimits, shlex.split(text)) if text else RequestLimits()


def create_app(client: AsyncClient | None = None, *, timeout_s: float | None = None,
               limits: RequestLimits | None = None) -> ASGIApp:
    if timeout_s is None:
        timeout_s = int(os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_MS))) / 1000.0
    limits = limits or limits_from_env()
    client = client or AsyncClient(timeout_s=timeout_s)

    metrics = metrics_from_env()
    grpc_flags = os.environ.get(GRPC_ENV, "")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # Set here, after gunicorn has set its own title in the forked worker.
        set_title(f"frontend:{os.environ.get(FRONTEND_INDEX_ENV) or os.getpid()}")
        grpc_server = None
        if grpc_flags:  # imported only here: a frontend without gRPC never loads grpcio
            from frontend.grpc_api import Services, start_server

            options = parse_flags(GrpcOptions, shlex.split(grpc_flags))
            grpc_server = await start_server(Services(client, timeout_s, options, limits, metrics))
        yield
        if grpc_server is not None:
            await grpc_server.stop(grace=1.0)
        client.close()

    rest = Starlette(routes=[], exception_handlers={HTTPException: not_found, Exception: server_error},
                     lifespan=lifespan)
    return RestApi(rest, client, timeout_s, limits, metrics)


app = create_app()

__all__ = ["app", "create_app"]
