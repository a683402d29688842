"""The frontends' HTTP protocol sends a response's head and body in one write."""

from __future__ import annotations

import asyncio
from typing import Any

from frontend.http_protocol import HeldHead

HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n"


class Transport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: Any) -> None:
        assert not self.closed, "written after close"
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str) -> str:
        return f"info:{name}"


def test_a_head_and_its_body_leave_in_one_write() -> None:
    async def main() -> list[bytes]:
        transport = Transport()
        held = HeldHead(transport, asyncio.get_running_loop())  # type: ignore[arg-type]
        held.write(HEAD)
        assert transport.writes == []
        held.write(memoryview(b"{}"))
        await asyncio.sleep(0)
        return transport.writes

    assert asyncio.run(main()) == [HEAD + b"{}"]


def test_a_head_without_a_body_this_turn_still_leaves_this_turn() -> None:
    async def main() -> list[bytes]:
        transport = Transport()
        held = HeldHead(transport, asyncio.get_running_loop())  # type: ignore[arg-type]
        held.write(HEAD)  # a HEAD request's answer, or a stream's first chunk still to come
        await asyncio.sleep(0)
        assert transport.writes == [HEAD]
        held.write(b"chunk")
        return transport.writes

    assert asyncio.run(main()) == [HEAD, b"chunk"]


def test_the_interim_100_continue_and_bodies_are_never_held() -> None:
    async def main() -> list[bytes]:
        transport = Transport()
        held = HeldHead(transport, asyncio.get_running_loop())  # type: ignore[arg-type]
        held.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        held.write(b"more of a body")
        return transport.writes

    assert asyncio.run(main()) == [b"HTTP/1.1 100 Continue\r\n\r\n", b"more of a body"]


def test_a_held_head_is_sent_before_the_connection_closes() -> None:
    async def main() -> Transport:
        transport = Transport()
        held = HeldHead(transport, asyncio.get_running_loop())  # type: ignore[arg-type]
        held.write(HEAD)
        held.close()
        assert held.get_extra_info("peername") == "info:peername"  # the rest is the transport's
        return transport

    transport = asyncio.run(main())
    assert transport.writes == [HEAD] and transport.closed
