"""uvicorn's HTTP protocol (httptools), answering each request with one write: the one module
that reaches into uvicorn's internals.

The fence: pyproject.toml bounds uvicorn below the minor after the one this module was
checked against (0.55); the classes, methods and attributes it uses are checked at import
and again on the first connection and request (the instance's). Where any is missing, ``FRONTEND_PROTOCOL``
is None and the frontend runs uvicorn's own protocol, every request through ASGI, after one
warning (``unavailable``) that says what is missing.

uvicorn writes a response's head and its body with two ``transport.write`` calls, and the
event loop sends each at once: two system calls, two TCP segments and two wake-ups of the
client per answer, where one does. On loopback a send also runs the receiver's side of
TCP, so the second write was about a tenth of a frontend's CPU per request (strace and
perf under bench). ``OneWriteProtocol`` holds a response head until the body follows
(always in the same turn of the event loop for the frontend's answers) and sends both
together; anything else still goes out in the same turn: a held head is sent on its own
when the turn ends, before the transport closes, or when the answer has no body (HEAD).
The interim ``100 Continue`` is never held.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson

log = logging.getLogger("tfbroker.frontend")

# What this module uses of uvicorn: the protocol class's methods, and its instances' attributes.
PROTOCOL_METHODS = ("connection_made", "connection_lost", "data_received", "on_headers_complete", "on_body",
                    "on_message_complete", "on_response_complete")
INSTANCE_ATTRIBUTES = ("parser", "cycle", "tasks", "root_path", "limit_concurrency", "access_log",
                       "expect_100_continue", "server_state", "logger", "loop", "app")
REQUEST_ATTRIBUTES = ("url", "headers")  # set as a request's head is parsed
unavailable = ""  # why the direct path is off, when it is

try:
    from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
except ImportError as exc:  # uvicorn without httptools, or a uvicorn that moved it
    unavailable = f"uvicorn's httptools protocol cannot be imported ({exc})"
    HttpToolsProtocol = object  # type: ignore[assignment,misc]
    STATUS_LINE = {}
else:
    missing = [name for name in PROTOCOL_METHODS if not callable(getattr(HttpToolsProtocol, name, None))]
    if missing:
        unavailable = f"uvicorn's HttpToolsProtocol lacks {', '.join(missing)}"

RESPONSE_HEAD = b"HTTP/1.1 "
CONTINUE = b"HTTP/1.1 100 "


class HeldHead:
    """A transport that keeps a response head until the next write; every other attribute
    is the transport's own."""

    __slots__ = ("transport", "loop", "head")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self.transport = transport
        self.loop = loop
        self.head: bytes | None = None

    def write(self, data: Any) -> None:
        head = self.head
        if head is not None:
            self.head = None
            self.transport.write(b"".join((head, data)))
        elif data[:9] == RESPONSE_HEAD and data[:13] != CONTINUE:
            self.head = bytes(data)
            self.loop.call_soon(self.flush)  # a head whose body is not written this turn goes alone
        else:
            self.transport.write(data)

    def write_answer(self, data: bytes) -> None:
        """A whole answer, head and body: sent at once."""
        self.flush()
        self.transport.write(data)

    def flush(self) -> None:
        head = self.head
        if head is not None:
            self.head = None
            self.transport.write(head)

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


class OneWriteProtocol(HttpToolsProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(HeldHead(transport, self.loop))  # type: ignore[arg-type]


class DirectPredictProtocol(OneWriteProtocol):
    """OneWriteProtocol that answers plain predict requests itself, below ASGI.

    uvicorn's per-request machinery (the scope, the cycle and its send and receive messages,
    header checks) was a quarter of a frontend's CPU per request under bench, more than
    the JSON. A request is plain when it is a keep-alive HTTP/1.1 POST with a Content-Length
    within the app's body limit, no Expect or Upgrade, nothing before it still unanswered on its
    connection, and a path the app takes as predict (``app.direct_predict_call``). The
    protocol reads its body, awaits ``app.direct_predict`` (the ASGI path's checks, answer
    and metrics) and writes the answer in one go. Everything else goes through ASGI as
    before, errors included. A stand-in cycle keeps uvicorn's own rules: a request
    pipelined behind a direct one waits its turn, and a shutdown lets the answer finish and
    then closes the connection. A client that goes away cancels its request at once.
    """

    checked = False  # the instance attributes, on the first connection and its first request
    checked_request = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._reading: tuple[Any, list[bytes]] | None = None  # the direct request being read: call, chunks
        self._answering: asyncio.Task[None] | None = None
        if not DirectPredictProtocol.checked:
            DirectPredictProtocol.checked = True
            self._check(INSTANCE_ATTRIBUTES)
        app = self.app
        self._direct_app = app if hasattr(app, "direct_predict") and not unavailable else None
        limits = getattr(app, "limits", None)
        self._body_limit = limits.max_request_body_bytes if limits is not None else 0

    def _check(self, names: tuple[str, ...]) -> None:
        global unavailable
        missing = [name for name in names if not hasattr(self, name)]
        if missing and not unavailable:
            unavailable = f"uvicorn's HttpToolsProtocol instances lack {', '.join(missing)}"
            log.warning("predict requests go through ASGI: %s (uvicorn %s)", unavailable, _uvicorn_version())
        if unavailable:
            self._direct_app = None

    def on_headers_complete(self) -> None:
        if not DirectPredictProtocol.checked_request:
            DirectPredictProtocol.checked_request = True
            self._check(REQUEST_ATTRIBUTES)
        call = self._direct_call()
        if call is None:
            self._reading = None
            super().on_headers_complete()
            return
        self._reading = (call, [])
        self.cycle = _Answering()  # type: ignore[assignment]

    def on_body(self, body: bytes) -> None:
        if self._reading is None:
            super().on_body(body)
        else:
            self._reading[1].append(body)

    def on_message_complete(self) -> None:
        if self._reading is None:
            super().on_message_complete()
            return
        (call, chunks), self._reading = self._reading, None
        task = self.loop.create_task(self._answer(self.cycle, call, self.headers, b"".join(chunks)))  # type: ignore[arg-type]
        self._answering = task
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._answering is not None:
            self._answering.cancel()  # the broker drops the request: nobody is left to answer
        super().connection_lost(exc)

    async def _answer(self, cycle: _Answering, call: Any, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        app = self._direct_app
        assert app is not None  # (only a direct request gets here)
        try:
            status, content, extra = await app.direct_predict(call, headers, body)
        except Exception as exc:  # noqa: BLE001 - as uvicorn does when an app fails: 500, then close
            self.logger.exception("the direct predict path failed")
            status, content, extra = 500, orjson.dumps({"error": f"frontend error: {type(exc).__name__}: {exc}"}), []
            cycle.keep_alive = False
        finally:
            self._answering = None
        close = not cycle.keep_alive or CONNECTION_CLOSE in extra
        if close and CONNECTION_CLOSE not in extra:
            extra = [*extra, CONNECTION_CLOSE]
        head = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:  # date (and server), as uvicorn's answers
            head += [name, b": ", value, b"\r\n"]
        if not extra or extra[0][0] != b"content-type":  # (an answer names any other type first)
            head.append(b"content-type: application/json\r\n")
        head += [b"content-length: ", str(len(content)).encode(), b"\r\n"]
        for name, value in extra:
            head += [name, b": ", value, b"\r\n"]
        head += [b"\r\n", content]
        cycle.response_complete = True
        if self.transport.is_closing():
            return
        self.transport.write_answer(b"".join(head))  # type: ignore[attr-defined]
        if close:
            self.transport.close()
        else:
            self.on_response_complete()  # uvicorn's: the next pipelined request, or the keep-alive timer

    def _direct_call(self) -> Any:
        if (self._direct_app is None or self.parser.get_method() != b"POST" or self.expect_100_continue
                or self.parser.get_http_version() != "1.1" or not self.parser.should_keep_alive()
                or self.parser.should_upgrade()
                or (self.cycle is not None and not self.cycle.response_complete)
                or self.root_path or self.limit_concurrency is not None or self.access_log
                or self.url[:4].lower() not in (b"/v1/", b"/v2/")):
            return None
        length = None
        for name, value in self.headers:
            if name == b"content-length":
                length = value
            elif name == b"transfer-encoding":
                return None
        if length is None or not length.isdigit() or int(length) > self._body_limit:
            return None  # chunked, or too large: the ASGI path reads it (and refuses it, 413)
        return self._direct_app.direct_predict_call(self.url.partition(b"?")[0].decode("latin-1"))


class _Answering:
    """The stand-in for uvicorn's RequestResponseCycle while a direct answer is on its way,
    with the attributes uvicorn's protocol reads and sets on it."""

    __slots__ = ("response_complete", "keep_alive", "disconnected")

    def __init__(self) -> None:
        self.response_complete = False
        self.keep_alive = True  # a shutdown sets it False: the connection closes after the answer
        self.disconnected = False

    @property
    def message_event(self) -> _NoEvent:
        return _NO_EVENT


class _NoEvent:
    def set(self) -> None:
        pass


_NO_EVENT = _NoEvent()
CONNECTION_CLOSE = (b"connection", b"close")


def _uvicorn_version() -> str:
    import uvicorn

    return str(uvicorn.__version__)


def frontend_protocol() -> type | None:
    """The protocol class the frontends run: the direct one, or None (uvicorn's own, with the
    warning logged once) when uvicorn lacks what it needs."""
    if unavailable:
        log.warning("predict requests go through ASGI: %s (uvicorn %s)", unavailable, _uvicorn_version())
        return None
    return DirectPredictProtocol
