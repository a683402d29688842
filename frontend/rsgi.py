"""The same REST API through granian's RSGI interface: ``granian --interface rsgi frontend.rsgi:app``.

granian parses HTTP in Rust; through RSGI the predict path also skips ASGI's message dicts
and goes straight to ``RestApi.run_predict`` with the same limits, deadline and metrics.
Every other path (status, metadata, classify, regress, the metrics page, 404s) runs the
ASGI app through a small adapter, so the answers are the same byte for byte. One
difference: a client that goes away does not cancel its queued prediction (the ASGI
frontend watches for it); the broker still drops it at its deadline.

Environment as for the ASGI app (TFBROKER_ADDRESS, TFBROKER_TIMEOUT_MS, TFBROKER_LIMITS,
the metrics variables); granian's own flags set workers, address and port.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any, MutableMapping

from tfbroker.wire.errors import Internal, TFBrokerError
from tfbroker.runtime.process import set_title
from frontend import routes
from frontend.app import Answer, RestApi, check_body_size, check_content_length, error_answer, timeout_from_header
from frontend.app import app as rest_app

JSON = ("content-type", "application/json")


class RsgiApp:
    def __init__(self, rest: RestApi) -> None:
        self.rest = rest

    def __rsgi_init__(self, loop: asyncio.AbstractEventLoop) -> None:
        set_title(f"frontend:{os.getpid()}")

    def __rsgi_del__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.rest.client.close()

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
        started = time.monotonic()
        headers = scope.headers
        try:
            check_content_length(headers.get("content-length"), rest.limits.max_request_body_bytes)
            timeout_s = timeout_from_header(headers.get("x-request-timeout-ms"), rest.timeout_s)
            rest.check_capacity()
            body = await protocol()
            check_body_size(len(body), rest.limits.max_request_body_bytes)
            rest.waiting += 1
            try:
                answer: Answer = await rest.run_predict(body, call, timeout_s)
            finally:
                rest.waiting -= 1
        except TFBrokerError as exc:
            answer = error_answer(exc)
        except Exception as exc:  # noqa: BLE001 - a bug answers this request with JSON, not the process
            answer = error_answer(Internal(f"frontend error: {type(exc).__name__}: {exc}"))
        status, content, extra = answer
        protocol.response_bytes(status, [JSON, *[(k.decode(), v.decode()) for k, v in extra]], content)
        if rest.metrics is not None:
            rest.metrics.observe(call.model, call.verb, status, started)

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
