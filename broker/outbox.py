"""The answers the broker has for each client in one turn of its loop, sent at the turn's end.

Every answer made during a turn (replies cut from results, errors, expiries, queries) waits
here until the loop's turn ends, then each client gets one message: a lone answer as
itself, several as one BUNDLE (tfbroker/wire/protocol.py). Nothing waits for company: the
turn ends as soon as the ready sockets are handled, so coalescing costs no latency, only
saves a system call and an I/O-thread wake-up per answer on both sides.
"""

from __future__ import annotations

from typing import Any, Callable

from tfbroker.wire import protocol

# A whole message to the frontend socket: the client's identity, then the message's frames.
SendMessage = Callable[[list[Any]], None]


class Outbox:
    def __init__(self, send: SendMessage) -> None:
        self._send = send
        self._by_client: dict[bytes, list[list[Any]]] = {}

    def add(self, client: bytes, member: list[Any]) -> None:
        """One answer, ``[REPLY|ERROR|HEARTBEAT, header, frames…]`` (no tag), for ``client``."""
        members = self._by_client.get(client)
        if members is None:
            self._by_client[client] = [member]
        else:
            members.append(member)

    def flush(self) -> None:
        """Send what the turn made: one message per client."""
        if not self._by_client:
            return
        by_client, self._by_client = self._by_client, {}
        for client, members in by_client.items():
            self._send([client, *protocol.bundle(members)])

    def __len__(self) -> int:
        return sum(len(members) for members in self._by_client.values())
