"""uvicorn's HTTP protocol (httptools), answering each request with one write.

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
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

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
