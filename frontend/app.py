"""The HTTP frontend: TF Serving's REST API as a Starlette app, ``frontend.app:app``.

Runs under uvicorn or gunicorn (``gunicorn -k uvicorn_worker.UvicornWorker frontend.app:app``)
and never imports TensorFlow: it parses JSON into arrays and passes them to the broker
through frontend.client. Settings come from the environment, since gunicorn owns the
command line: TFBROKER_ADDRESS (the broker's frontend socket), TFBROKER_TIMEOUT_MS (the
request deadline, TF Serving's --rest_api_timeout_in_ms) and TFBROKER_FRONTEND_INDEX (N in
the process title ``tfbroker: frontend:N``).
"""

from __future__ import annotations

import contextlib
import os
import re
from typing import Any, AsyncIterator

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from broker.config import FRONTEND_INDEX_ENV, TIMEOUT_ENV
from broker.errors import NotFound, TFBrokerError
from broker.process import set_title
from frontend.client import AsyncClient
from frontend.json_tensor import format_predictions, parse_predict_body


_PREFIX = "/v1/models/"
_MODEL_PATH = re.compile(
    r"(?P<name>[^/:]+)"
    r"(?:/versions/(?P<version>\d+)|/labels/(?P<label>[^/:]+))?"
    r"(?:(?P<metadata>/metadata)|:(?P<verb>[a-z]+))?")


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    return Response(content, status_code=status, media_type="application/json", headers=headers)


def error_response(error: TFBrokerError) -> Response:
    return json_response({"error": error.message}, error.http_status)


class ModelsEndpoint:
    """Everything under /v1/models/: status and metadata through Starlette, and predict."""

    def __init__(self, client: AsyncClient, timeout_s: float) -> None:
        self.client = client
        self.timeout_s = timeout_s

    async def handle(self, request: Request) -> Response:
        match = _MODEL_PATH.fullmatch(request.path_params["rest"])
        try:
            if match is None:
                raise NotFound(f"Malformed request: {request.method} {request.url.path}")
            name, label, verb = match["name"], match["label"], match["verb"]
            version = int(match["version"]) if match["version"] else None
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

    async def run_predict(self, body: bytes, name: str, version: int | None,
                          label: str | None) -> tuple[int, bytes, str]:
        """(HTTP status, JSON body, serving version or "") for one :predict call."""
        try:
            inputs, signature, row_format = parse_predict_body(body)
            prediction = await self.client.predict(name, inputs, version=version, label=label,
                                                   signature_name=signature, timeout_s=self.timeout_s)
            return 200, format_predictions(prediction.outputs, row_format), str(prediction.version)
        except TFBrokerError as exc:
            return exc.http_status, orjson.dumps({"error": exc.message}), ""

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
        body = await _read_body(receive)
        version = int(match["version"]) if match["version"] else None
        status, content, model_version = await self.endpoint.run_predict(body, match["name"], version,
                                                                         match["label"])
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(content)).encode())]
        if model_version:
            headers.append((b"x-model-version", model_version.encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": content})


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)

async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return json_response({"error": f"{exc.detail}: {request.method} {request.url.path}"}, exc.status_code)


def create_app(client: AsyncClient | None = None, *, timeout_s: float | None = None) -> ASGIApp:
    if timeout_s is None:
        timeout_s = int(os.environ.get(TIMEOUT_ENV, "30000")) / 1000.0
    client = client or AsyncClient(timeout_s=timeout_s)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # Set here, after gunicorn has set its own title in the forked worker.
        set_title(f"frontend:{os.environ.get(FRONTEND_INDEX_ENV) or os.getpid()}")
        yield
        client.close()

    endpoint = ModelsEndpoint(client, timeout_s)
    app = Starlette(
        routes=[Route("/v1/models/{rest:path}", endpoint.handle, methods=["GET", "POST"])],
        exception_handlers={HTTPException: http_error},
        lifespan=lifespan,
    )
    return PredictFastPath(app, endpoint)  # type: ignore[return-value]


app = create_app()

__all__ = ["app", "create_app"]
