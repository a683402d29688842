"""The same REST API through granian's RSGI interface: ``granian --interface rsgi frontend.rsgi:app``.

granian parses HTTP in Rust; through RSGI the predict path also skips ASGI's message dicts
and goes straight to ``RestApi.run_predict`` (the frontend's one pipeline: limits, deadline,
metrics, traces). Each worker starts what a uvicorn frontend starts: the tracer when
configured, the request log, and gRPC when TFBROKER_FRONTEND names a port.
Every other path (status, metadata, classify, regress, the metrics page, 404s) runs the
ASGI app through a small adapter, so the answers are the same byte for byte. One
difference: a client that goes away does not cancel its queued prediction (the ASGI
frontend watches for it); the broker still drops it at its deadline.

Environment as for the ASGI app (TFBROKER_FRONTEND); granian's own flags set workers,
address and port.
"""

from __future__ import annotations

import asyncio
from typing import Any, MutableMapping

from tfbroker.wire.errors import TFBrokerError
from frontend import routes
from frontend.app import TIMEOUT_HEADER, RestApi, check_body_size, check_content_length, start_services, stop_services
from frontend.app import app as rest_app

JSON = ("content-type", "application/json")
FORWARDED = (TIMEOUT_HEADER.decode(), "traceparent", "tracestate")


class RsgiApp:
    def __init__(self, rest: RestApi) -> None:
        self.rest = rest
        self.grpc: Any = None

    def __rsgi_init__(self, loop: asyncio.AbstractEventLoop) -> None:
        # As under uvicorn, on this worker's loop: the tracer, the request log, and gRPC (each
        # worker binds the port: SO_REUSEPORT).
        self.grpc = loop.run_until_complete(start_services(self.rest.pipeline))

    def __rsgi_del__(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.run_until_complete(stop_services(self.rest.pipeline, self.grpc))

    async def __rsgi__(self, scope: Any, protocol: Any) -> None:
        if scope.proto != "http":
            return  # no websockets in TF Serving's API
        path = scope.path
        if scope.method == "POST" and routes.is_api_path(path):
            try:
                call = routes.parse(scope.method, path)
            except TFBrokerError:
                call = None  # the ASGI app answers it
            if call is not None and call.verb == "predict":
                await self.predict(call, scope, protocol)
                return
        await self.asgi(scope, protocol)

    async def predict(self, call: routes.RestCall, scope: Any, protocol: Any) -> None:
        rest = self.rest
        headers = scope.headers
        limit = rest.limits.max_request_body_bytes

        async def read_body() -> bytes:
            check_content_length(headers.get("content-length"), limit)
            body: bytes = await protocol()
            check_body_size(len(body), limit)
            return body

        # The ones the pipeline reads, as ASGI spells them: the caller's deadline and trace.
        pairs = [(name.encode(), value.encode("latin-1")) for name in FORWARDED if (value := headers.get(name)) is not None]
        status, content, extra = await rest.run_predict(call, pairs, read_body)
        protocol.response_bytes(status, [JSON, *[(k.decode(), v.decode()) for k, v in extra]], content)

    async def asgi(self, scope: Any, protocol: Any) -> None:
        """Any other request, through the ASGI app: the body read whole, the answer sent whole."""
        body = await protocol()
        asgi_scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": scope.http_version, "method": scope.method,
            "scheme": scope.scheme, "path": scope.path, "raw_path": scope.path.encode(), "root_path": "",
            "query_string": scope.query_string.encode(), "server": None, "client": None,
            "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in scope.headers.items()],
        }
        delivered = False
        start: dict[str, Any] = {}
        chunks: list[bytes] = []

        async def receive() -> dict[str, Any]:
            nonlocal delivered
            if delivered:
                return {"type": "http.disconnect"}
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
            else:
                chunks.append(message.get("body", b""))

        await self.rest(asgi_scope, receive, send)
        protocol.response_bytes(start.get("status", 500),
                                [(k.decode("latin-1"), v.decode("latin-1")) for k, v in start.get("headers", [])],
                                b"".join(chunks))


assert isinstance(rest_app, RestApi)
app = RsgiApp(rest_app)
