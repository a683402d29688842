"""The HTTP frontend: TF Serving's REST API as a Starlette app, ``frontend.app:app``.

Runs under uvicorn or gunicorn (``gunicorn -k uvicorn_worker.UvicornWorker frontend.app:app``)
and never imports TensorFlow: it parses JSON into arrays and passes them to the broker
through frontend.client. Settings come from the environment, since gunicorn owns the
command line: TFBROKER_ADDRESS (the broker's frontend socket), TFBROKER_TIMEOUT_MS (the
request deadline, TF Serving's --rest_api_timeout_in_ms), TFBROKER_LIMITS (RequestLimits as
flags) and TFBROKER_FRONTEND_INDEX (N in the process title ``tfbroker: frontend:N``).

Every answer, errors included, is JSON: ``{"error": "…"}`` with the status of the error's
class (broker/errors.py); a 503 carries ``Retry-After``. A caller may ask for a shorter
deadline than TFBROKER_TIMEOUT_MS with the header ``X-Request-Timeout-Ms``. A client that
disconnects cancels its request: the broker drops it if it has not been dispatched.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shlex
from typing import Any, AsyncIterator

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from broker.config import DEFAULT_TIMEOUT_MS, FRONTEND_INDEX_ENV, LIMITS_ENV, TIMEOUT_ENV, RequestLimits
from broker.errors import Internal, InvalidArgument, NotFound, PayloadTooLarge, TFBrokerError, Unavailable
from broker.flags import parse_flags
from broker.process import set_title
from broker.protocol import MAX_INT64
from frontend.client import AsyncClient
from frontend.json_tensor import format_predictions, parse_predict_body

log = logging.getLogger("tfbroker.frontend")

RETRY_AFTER_S = "1"  # what a 503 (queue full, model loading, worker restarting) tells callers
TIMEOUT_HEADER = b"x-request-timeout-ms"
DISCONNECT_WATCH_AFTER_S = 0.05


_PREFIX = "/v1/models/"
_MODEL_PATH = re.compile(
    r"(?P<name>[^/:]+)"
    r"(?:/versions/(?P<version>\d+)|/labels/(?P<label>[^/:]+))?"
    r"(?:(?P<metadata>/metadata)|:(?P<verb>[a-z]+))?")


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    return Response(content, status_code=status, media_type="application/json", headers=headers)


def error_response(error: TFBrokerError) -> Response:
    headers = {"retry-after": RETRY_AFTER_S} if error.http_status == 503 else None
    return json_response({"error": error.message}, error.http_status, headers)


def parse_version(text: str | None) -> int | None:
    if text is None:
        return None
    version = int(text)
    if version > MAX_INT64:
        raise InvalidArgument(f"Malformed request: version {text} does not fit a 64-bit integer")
    return version


class ModelsEndpoint:
    """Everything under /v1/models/: status and metadata through Starlette, and predict."""

    def __init__(self, client: AsyncClient, timeout_s: float, limits: RequestLimits) -> None:
        self.client = client
        self.timeout_s = timeout_s
        self.limits = limits

    async def handle(self, request: Request) -> Response:
        match = _MODEL_PATH.fullmatch(request.path_params["rest"])
        try:
            if match is None:
                raise NotFound(f"Malformed request: {request.method} {request.url.path}")
            name, label, verb = match["name"], match["label"], match["verb"]
            version = parse_version(match["version"])
            if request.method == "POST":  # :predict is served by PredictFastPath
                if verb in ("classify", "regress"):
                    return json_response({"error": f"{verb} is not supported yet; use :predict"}, 501)
                raise NotFound(f"Malformed request: POST {request.url.path}")
            if verb is not None:
                raise NotFound(f"Malformed request: GET {request.url.path}")
            if match["metadata"]:
                return await self.metadata(name, version, label)
            status = await self.client.status(name, version=version, label=label)
            return json_response({"model_version_status": status["model_version_status"]})
        except TFBrokerError as exc:
            return error_response(exc)

    async def run_predict(self, body: bytes, name: str, version: str | None, label: str | None,
                          timeout_s: float) -> tuple[int, bytes, str]:
        """(HTTP status, JSON body, serving version or "") for one :predict call."""
        try:
            inputs, signature, row_format = parse_predict_body(body, self.limits)
            prediction = await self.client.predict(name, inputs, version=parse_version(version), label=label,
                                                   signature_name=signature, timeout_s=timeout_s)
            return 200, format_predictions(prediction.outputs, row_format), str(prediction.version)
        except TFBrokerError as exc:
            return exc.http_status, orjson.dumps({"error": exc.message}), ""
        except Exception as exc:  # noqa: BLE001 - a bug answers this request with JSON, not the process
            log.exception("predict failed")
            return 500, orjson.dumps({"error": f"frontend error: {type(exc).__name__}: {exc}"}), ""

    async def metadata(self, name: str, version: int | None, label: str | None) -> Response:
        reply = await self.client.metadata(name, version=version, label=label)
        return json_response({
            "model_spec": {"name": name, "signature_name": "", "version": str(reply["version"])},
            "metadata": {"signature_def": reply["signature_def"]},
        })


class PredictFastPath:
    """POST .../:predict straight on ASGI, around the Starlette app that serves the rest.

    The hot path of every request: no routing table, middleware or Request and Response
    objects (a third of a frontend's CPU per request, measured with py-spy under bench).
    """

    def __init__(self, app: ASGIApp, endpoint: ModelsEndpoint) -> None:
        self.app = app
        self.endpoint = endpoint
        self.waiting = 0  # predictions waiting on the broker (max_concurrent_predictions)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if (scope["type"] != "http" or scope["method"] != "POST" or not path.endswith(":predict")
                or not path.startswith(_PREFIX)):
            await self.app(scope, receive, send)
            return
        match = _MODEL_PATH.fullmatch(path[len(_PREFIX):])
        if match is None:
            await self.app(scope, receive, send)
            return
        limits = self.endpoint.limits
        try:
            body = await _read_body(scope, receive, limits.max_request_body_bytes)
            timeout_s = _timeout_s(scope, self.endpoint.timeout_s)
            if self.waiting >= limits.max_concurrent_predictions:
                # Overload: refuse before spending anything on the request, so the admitted
                # ones keep the CPU and their latency stays bounded.
                raise Unavailable(f"this frontend has {self.waiting} predictions waiting, its limit; retry later")
        except TFBrokerError as exc:
            await _respond(send, exc.http_status, orjson.dumps({"error": exc.message}), "")
            return
        # A request still waiting after DISCONNECT_WATCH_AFTER_S starts watching for its client
        # going away, and is cancelled (taken out of the broker's queue) when it does. Most
        # requests are answered sooner and never pay for the watcher task.
        current = asyncio.current_task()
        watchers: list[asyncio.Future[Any]] = []

        def on_receive(done: asyncio.Future[Any]) -> None:
            if current is not None and not done.cancelled() and done.exception() is None:
                if done.result().get("type") == "http.disconnect":
                    current.cancel()

        def watch() -> None:
            watcher = asyncio.ensure_future(receive())
            watcher.add_done_callback(on_receive)
            watchers.append(watcher)

        timer = asyncio.get_running_loop().call_later(DISCONNECT_WATCH_AFTER_S, watch)
        self.waiting += 1
        try:
            status, content, model_version = await self.endpoint.run_predict(
                body, match["name"], match["version"], match["label"], timeout_s)
        except asyncio.CancelledError:
            if watchers and watchers[0].done() and not watchers[0].cancelled():
                return  # the client is gone: nobody to answer
            raise
        finally:
            self.waiting -= 1
            timer.cancel()
            for watcher in watchers:
                watcher.remove_done_callback(on_receive)
                watcher.cancel()
        await _respond(send, status, content, model_version)


async def _respond(send: Send, status: int, content: bytes, model_version: str) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(content)).encode())]
    if model_version:
        headers.append((b"x-model-version", model_version.encode()))
    if status == 503:
        headers.append((b"retry-after", RETRY_AFTER_S.encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": content})


async def _read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The request body, refused (413) as soon as it is known to exceed ``limit`` bytes."""
    for name, value in scope["headers"]:
        if name == b"content-length" and value.isdigit() and int(value) > limit:
            raise PayloadTooLarge(f"the request body ({int(value)} bytes) exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise InvalidArgument("the client went away before sending the whole request")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


def _timeout_s(scope: Scope, default_s: float) -> float:
    """The deadline: the server's, or less when the caller asks (X-Request-Timeout-Ms)."""
    for name, value in scope["headers"]:
        if name == TIMEOUT_HEADER:
            if not value.isdigit() or int(value) < 1:
                raise InvalidArgument(f"X-Request-Timeout-Ms must be a positive integer, got {value.decode(errors='replace')!r}")
            return min(default_s, int(value) / 1000.0)
    return default_s


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return json_response({"error": f"{exc.detail}: {request.method} {request.url.path}"}, exc.status_code)


async def server_error(request: Request, exc: Exception) -> Response:
    log.error("request %s %s failed", request.method, request.url.path, exc_info=exc)
    return error_response(Internal(f"frontend error: {type(exc).__name__}: {exc}"))


def limits_from_env() -> RequestLimits:
    text = os.environ.get(LIMITS_ENV, "")
    return parse_flags(RequestLimits, shlex.split(text)) if text else RequestLimits()


def create_app(client: AsyncClient | None = None, *, timeout_s: float | None = None,
               limits: RequestLimits | None = None) -> ASGIApp:
    if timeout_s is None:
        timeout_s = int(os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_MS))) / 1000.0
    limits = limits or limits_from_env()
    client = client or AsyncClient(timeout_s=timeout_s)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # Set here, after gunicorn has set its own title in the forked worker.
        set_title(f"frontend:{os.environ.get(FRONTEND_INDEX_ENV) or os.getpid()}")
        yield
        client.close()

    endpoint = ModelsEndpoint(client, timeout_s, limits)
    app = Starlette(
        routes=[Route("/v1/models/{rest:path}", endpoint.handle, methods=["GET", "POST"])],
        exception_handlers={HTTPException: http_error, Exception: server_error},
        lifespan=lifespan,
    )
    return PredictFastPath(app, endpoint)  # type: ignore[return-value]


app = create_app()

__all__ = ["app", "create_app"]
