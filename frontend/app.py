"""The HTTP frontend: TF Serving's REST API and the Open Inference Protocol's on ASGI,
``frontend.app:app``.

Runs under uvicorn or gunicorn (``gunicorn -c python:frontend.gunicorn_conf frontend.app:app``)
and never imports TensorFlow: it parses JSON into arrays and passes them to the broker
through tfbroker's AsyncClient. Its settings are one FrontendConfig
(tfbroker/runtime/settings.py), as flags in the environment variable TFBROKER_FRONTEND,
since gunicorn owns the command line; TFBROKER_FRONTEND_INDEX is N in the process title
``tfbroker: frontend:N``. With a gRPC port in the config the frontend serves TF Serving's
gRPC services and the Open Inference Protocol's on the same event loop (frontend/grpc_api.py).

Everything under ``/v1/`` is served here on raw ASGI (frontend/routes.py matches the paths
as TF Serving does), everything under ``/v2/`` by frontend/oip_rest.py; Starlette serves the
rest (404) and the lifespan. Every call goes through the frontend's one Pipeline
(frontend/pipeline.py: capacity, deadline, errors, metrics). Every answer, errors included,
is JSON: ``{"error": "…"}`` with the status of the error's class (tfbroker/wire/errors.py);
a 503 carries ``Retry-After``. A caller may ask for a shorter deadline than
``--rest_api_timeout_in_ms`` with the header ``X-Request-Timeout-Ms``. A client that
disconnects cancels its request: the broker drops it if it has not been dispatched.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import Any, AsyncIterator, Awaitable, Callable

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from tfbroker.async_client import AsyncClient
from tfbroker.client import Prediction
from tfbroker.runtime import tracing
from tfbroker.runtime.process import set_title
from tfbroker.runtime.settings import FRONTEND_INDEX_ENV, FrontendConfig
from tfbroker.wire.errors import (PLAIN_INPUTS, PLAIN_INSTANCES, Internal, InvalidArgument, NotFound, PayloadTooLarge,
                                  TFBrokerError)
from frontend import oip_rest, routes, status_page
from frontend.answers import JSON, Answer, error_answer
from frontend.disconnects import DisconnectWatch
from frontend.json_errors import JsonTypeError
from frontend.json_tensor import format_predictions, parse_predict_body
from frontend.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from frontend.metrics import for_config as metrics_for_config
from frontend.oip_rest import OipRest, answer_type
from frontend.request_log import RequestLog
from frontend.model_call import CLASSIFY, METADATA, PREDICT, REGRESS, ModelCall
from frontend.pipeline import Pipeline
from frontend.tf_example import format_results, parse_examples

log = logging.getLogger("tfbroker.frontend")

TIMEOUT_HEADER = b"x-request-timeout-ms"
DISCONNECT_WATCH_AFTER_S = 0.05
# TF Serving's answer to a CORS preflight.
CORS = [(b"access-control-allow-origin", b"*"), (b"access-control-allow-methods", b"POST, GET"),
        (b"access-control-allow-headers", b"Content-Type")]


class RestApi:
    """Everything under /v1/ (TF Serving's REST API) and /v2/ (the Open Inference Protocol's,
    frontend/oip_rest.py), each call through the frontend's one Pipeline; the metrics and
    status pages; other paths go to ``app`` (Starlette: 404 and the lifespan)."""

    def __init__(self, app: ASGIApp, pipeline: Pipeline, *, status_page: bool = False) -> None:
        self.app = app
        self.pipeline = pipeline
        self.client = pipeline.client
        self.limits = pipeline.limits
        self.metrics = pipeline.metrics
        self.status_page = status_page and self.metrics is not None
        self.disconnects = DisconnectWatch(DISCONNECT_WATCH_AFTER_S)
        self.oip = OipRest(pipeline)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if oip_rest.is_oip_path(path):
            await self.oip_call(scope, receive, send)
            return
        if not routes.is_api_path(path):
            if self.metrics is not None and path == self.metrics.path:
                await self.scrape(send)
            elif self.status_page and path in (status_page.PATH, status_page.JSON_PATH):
                await self.show_status(scope, send)
            else:
                await self.app(scope, receive, send)
            return
        raw = scope.get("raw_path")
        path = raw.decode("latin-1").partition("?")[0] if raw else path
        method = scope["method"]
        try:
            if method == "OPTIONS":
                answer = cors_preflight(scope)
            else:
                call = routes.parse(method, path)
                if call.verb == "predict":
                    await self.predict(call, scope, receive, send)
                    return
                answer = await self.answer(call, scope, receive)
        except TFBrokerError as exc:
            answer = error_answer(exc)
        await _respond(send, *answer)

    async def oip_call(self, scope: Scope, receive: Receive, send: Send) -> None:
        """An Open Inference Protocol request: its body read (413 beyond the limit), answered whole."""
        try:
            body = await _read_body(scope, receive, self.limits.max_request_body_bytes) \
                if scope["method"] == "POST" else b""
        except TFBrokerError as exc:
            answer = error_answer(exc)
        else:
            answer = await self.oip.answer(scope["method"], scope["path"], scope["headers"], body)
        await _respond(send, *answer, content_type=answer_type(answer))

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
        """classify, regress, metadata and status, through the pipeline."""
        verb = call.verb

        async def parse() -> ModelCall:
            model_call = ModelCall(verb, call.model, call.version, call.label)
            if verb in (CLASSIFY, REGRESS):
                body = await _read_body(scope, receive, self.limits.max_request_body_bytes)
                model_call.inputs, model_call.signature_name = parse_examples(body, verb)
                model_call.timeout_s = _asked_timeout_s(scope["headers"])
            return model_call

        try:
            return await self.pipeline.run("REST", verb, call.model, parse, _rest_answer, scope["headers"])
        except TFBrokerError as exc:
            return error_answer(exc)

    def direct_predict_call(self, path: str) -> routes.RestCall | oip_rest.InferCall | None:
        """The predict (or the Open Inference Protocol's infer) call ``path`` makes, when the
        HTTP protocol may answer it itself (frontend/http_protocol.py); None for any other
        path, which then comes through ASGI (errors included)."""
        if oip_rest.is_oip_path(path):
            return oip_rest.infer_call(path)
        if not routes.is_api_path(path):
            return None
        try:
            call = routes.parse("POST", path)
        except TFBrokerError:
            return None
        return call if call.verb == "predict" else None

    async def direct_predict(self, call: routes.RestCall | oip_rest.InferCall, headers: list[tuple[bytes, bytes]],
                             body: bytes) -> Answer:
        """predict (or infer) for a request the HTTP protocol has read whole, as over ASGI;
        the protocol cancels it when its client goes away (then the broker drops the request).
        A binary answer names its content type first among its headers (JSON goes without)."""
        if isinstance(call, oip_rest.InferCall):
            answer = await self.oip.infer(call.model, call.version, call.label, headers, body)
            kind = answer_type(answer)
            return answer[0], answer[1], _closing_headers([kind, *answer[2]] if kind != JSON else answer[2])
        status, content, extra = await self.run_predict(call, headers, body)
        return status, content, _closing_headers(extra)

    async def predict(self, call: routes.RestCall, scope: Scope, receive: Receive, send: Send) -> None:
        """predict through ASGI, for the requests the HTTP protocol does not answer itself
        (direct_predict): no routing table, middleware, Request or Response objects (a third
        of a frontend's CPU per request, measured with py-spy under bench)."""
        # A request still waiting after DISCONNECT_WATCH_AFTER_S starts watching for its client
        # going away, and is cancelled (taken out of the broker's queue) when it does.
        task = asyncio.current_task()
        assert task is not None  # (ASGI runs every request in a task)
        self.disconnects.add(task, receive, asyncio.get_running_loop())
        try:
            answer = await self.run_predict(
                call, scope["headers"], lambda: _read_body(scope, receive, self.limits.max_request_body_bytes))
        except asyncio.CancelledError:
            if self.disconnects.done(task):
                return  # the client is gone: nobody to answer
            raise
        finally:
            self.disconnects.done(task)
        await _respond(send, *answer)

    async def run_predict(self, call: routes.RestCall, headers: list[tuple[bytes, bytes]],
                          body: bytes | Callable[[], Awaitable[bytes]]) -> Answer:
        """One :predict: TF Serving's JSON in and out, the rest the pipeline's. ``body``, or
        the read that gives it (then inside the capacity gate)."""
        columnar = False

        def parse() -> ModelCall | Awaitable[ModelCall]:
            if not isinstance(body, bytes):
                return read_then_parse(body())
            nonlocal columnar
            try:
                inputs, signature, row_format = parse_predict_body(body, self.limits)
            except JsonTypeError as exc:
                return self.name_dtype_then_raise(exc, call, body)
            columnar = not row_format
            return ModelCall(PREDICT, call.model, call.version, call.label, signature, inputs,
                             timeout_s=_asked_timeout_s(headers), answer_as=row_format)

        async def read_then_parse(read: Awaitable[bytes]) -> ModelCall:
            nonlocal body
            body = await read
            parsed = parse()
            return parsed if isinstance(parsed, ModelCall) else await parsed

        try:
            return await self.pipeline.run("REST", PREDICT, call.model, parse, _predict_answer, headers)
        except TFBrokerError as exc:
            if columnar and exc.message == PLAIN_INSTANCES:
                exc = InvalidArgument(PLAIN_INPUTS)  # TF Serving's words for the columnar form
            return error_answer(exc)

    async def name_dtype_then_raise(self, error: JsonTypeError, call: routes.RestCall, body: bytes) -> ModelCall:
        raise await self.name_dtype(error, call, body) from None

    async def name_dtype(self, error: JsonTypeError, call: routes.RestCall, body: bytes) -> TFBrokerError:
        """The type error with the input's dtype as TensorFlow names it (``float``), from the
        model's metadata: one broker call, on this error path only."""
        try:
            metadata = await self.client.metadata(call.model, version=call.version, label=call.label)
            signature_name = orjson.loads(body).get("signature_name") or "serving_default"
            inputs = metadata["signature_def"]["signature_def"][signature_name]["inputs"]
            # A value the request does not name ("instances": [...]) is the only input's.
            info = inputs[error.name] if error.name in inputs or len(inputs) != 1 else next(iter(inputs.values()))
            return error.with_dtype(str(info["dtype"]).removeprefix("DT_").lower())
        except (TFBrokerError, KeyError, StopIteration, ValueError, AttributeError):
            return error  # the model's own error will say more; keep TF Serving's text without the dtype


def _predict_answer(call: ModelCall, prediction: Prediction) -> Answer:
    return (200, format_predictions(prediction.outputs, call.answer_as),
            [(b"x-model-version", str(prediction.version).encode())])


def _rest_answer(call: ModelCall, result: Any) -> Answer:
    """classify, regress, metadata and status in TF Serving's JSON."""
    if call.verb in (CLASSIFY, REGRESS):
        return (200, format_results(call.verb, result.outputs, len(call.inputs)),
                [(b"x-model-version", str(result.version).encode())])
    if call.verb == METADATA:
        body = {"model_spec": {"name": call.model, "signature_name": "", "version": str(result["version"])},
                "metadata": {"signature_def": result["signature_def"]}}
    else:
        body = {"model_version_status": result["model_version_status"]}
    return 200, orjson.dumps(body), []


# Set while this frontend shuts down (frontend/uvicorn_worker.py): every answer then closes its
# connection, so a proxy stops reusing it before the frontend goes, instead of meeting a reset.
closing = [False]
CONNECTION_CLOSE = (b"connection", b"close")


def _closing_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return [*headers, CONNECTION_CLOSE] if closing[0] else headers


async def _respond(send: Send, status: int, content: bytes, headers: list[tuple[bytes, bytes]], *,
                   content_type: tuple[bytes, bytes] = JSON) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [content_type, (b"content-length", str(len(content)).encode()), *_closing_headers(headers)]})
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


def asked_timeout_s(value: bytes | str | None) -> float | None:
    """The deadline a caller asks for with X-Request-Timeout-Ms (the pipeline keeps the
    server's when it is sooner)."""
    if value is None:
        return None
    if not value.isdigit() or int(value) < 1:
        shown = value.decode(errors="replace") if isinstance(value, bytes) else value
        raise InvalidArgument(f"X-Request-Timeout-Ms must be a positive integer, got {shown!r}")
    return int(value) / 1000.0


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


def _asked_timeout_s(headers: list[tuple[bytes, bytes]]) -> float | None:
    """The deadline the caller asks for (X-Request-Timeout-Ms), if any."""
    for name, value in headers:
        if name == TIMEOUT_HEADER:
            return asked_timeout_s(value)
    return None


async def not_found(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 404
    error = NotFound(f"{request.method} {request.url.path} is not part of the API (it is under /v1/)")
    return Response(orjson.dumps({"error": error.message}), status_code=status, media_type="application/json")


async def server_error(request: Request, exc: Exception) -> Response:
    log.error("request %s %s failed", request.method, request.url.path, exc_info=exc)
    status, content, _ = error_answer(Internal(f"frontend error: {type(exc).__name__}: {exc}"))
    return Response(content, status_code=status, media_type="application/json")


def create_app(client: AsyncClient | None = None, *, config: FrontendConfig | None = None) -> ASGIApp:
    """The frontend's ASGI app: ``config`` (FrontendConfig.from_env() when not given) and a
    broker client (one to ``config.frontend_address`` when not given)."""
    config = config or FrontendConfig.from_env()
    # Its calls carry the frontend's own spans, when tracing, never a context of its own.
    client = client or AsyncClient(config.frontend_address or None, timeout_s=config.timeout_s, continue_traces=False)
    pipeline = Pipeline(client, config, metrics_for_config(config))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        grpc_server = await start_services(pipeline)
        yield
        await stop_services(pipeline, grpc_server)

    rest = Starlette(routes=[], exception_handlers={HTTPException: not_found, Exception: server_error},
                     lifespan=lifespan)
    return RestApi(rest, pipeline, status_page=config.enable_status_page)


async def start_services(pipeline: Pipeline) -> Any:
    """What a frontend process runs beside its HTTP server, once it is forked (uvicorn's
    lifespan, granian's RSGI init): its title, the tracer (the exporter's thread), the request
    log and the gRPC services. The gRPC server, for stop_services."""
    # Set here, after gunicorn (or granian) has set its own title in the forked worker.
    role = f"frontend:{os.environ.get(FRONTEND_INDEX_ENV) or os.getpid()}"
    set_title(role)
    pipeline.tracer = tracing.start_in_child(role)
    metrics = pipeline.metrics
    pipeline.request_log = RequestLog(pipeline.client, max_file_bytes=pipeline.config.request_log_max_file_bytes,
                                      counter=metrics.request_log_records if metrics else None)
    pipeline.request_log.start()
    return await start_grpc(pipeline)


async def stop_services(pipeline: Pipeline, grpc_server: Any) -> None:
    """Not ready from now; gRPC's calls finish (1 s at most), the request log writes what it
    holds, and the broker client and the tracer close."""
    pipeline.stopping = True
    if grpc_server is not None:
        await grpc_server.stop(grace=1.0)
    if pipeline.request_log is not None:
        await pipeline.request_log.stop()
    pipeline.client.close()
    if pipeline.tracer is not None:
        pipeline.tracer.shutdown()


async def start_grpc(pipeline: Pipeline) -> Any:
    """The gRPC services on this event loop, when the config has a port or socket for them
    (grpcio is imported only then)."""
    if not pipeline.config.grpc.enabled:
        return None
    from frontend.grpc_server import start_server

    return await start_server(pipeline)


app = create_app()

__all__ = ["app", "create_app"]
