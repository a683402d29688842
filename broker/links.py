"""The broker's side of its children on the backend socket: one link per process (a model
worker replica or an I/O batcher), and the supervision both kinds share (reap, restart when
due, heartbeats, silence), in gunicorn's words.

What a link's readiness means is its owner's: a worker replica's is a state of its version's
lifecycle (broker/lifecycle.py), an I/O batcher's is its IoReady (broker/lookups.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

from broker.batching import Task
from broker.supervisor import Child, reap_children
from tfbroker.wire import protocol

L = TypeVar("L", bound="ChildLink")

# One message to a child on the backend socket: identity, command, header, frames.
SendToChild = Callable[[bytes, bytes, protocol.Header, Sequence[object]], None]


@dataclass(slots=True)
class ChildLink:
    """One child process and its socket identity, and when it and the broker last spoke."""

    child: Child
    identity: bytes = b""
    last_heard: float = 0.0
    last_sent: float = 0.0


@dataclass(slots=True)
class WorkerLink(ChildLink):
    """A version's replica on one device, and its batches in flight (batch id -> signature, tasks)."""

    replica: int = 0
    device: str = "cpu"
    error: str = ""  # why it failed to load, from its DISCONNECT
    in_flight: dict[int, tuple[str, list[Task]]] = field(default_factory=dict)
    disconnect_sent: float = 0.0  # when the broker told it to go (unload)
    batches: int = 0  # batches sent to this process
    load_failures: int = 0  # failed loads of this replica's version, retried (--max_num_load_retries)
    isolating: int = 0  # the suspect batch it runs alone (Batch.suspect): it takes nothing else until answered

    def tasks(self) -> Iterator[Task]:
        """Every request in its batches in flight."""
        for _signature, tasks in self.in_flight.values():
            yield from tasks

    def take_in_flight(self) -> list[Task]:
        """Its batches' requests, which it will not answer (it died, or their version failed)."""
        tasks = list(self.tasks())
        self.in_flight.clear()
        self.isolating = 0
        return tasks


def reap_links(links: Iterable[L]) -> list[tuple[L, int]]:
    """The links whose process exited, with its exit code."""
    by_child = {id(link.child): link for link in links}
    return [(by_child[id(child)], code) for child, code in reap_children([link.child for link in by_child.values()])]


def restarts_due(links: Iterable[L], now: float) -> list[L]:
    """The links whose process is to be started again now (its back-off is over)."""
    return [link for link in links if link.child.restart_at and now >= link.child.restart_at]


def silent(link: ChildLink, now: float, expiry_s: float) -> bool:
    """A running process that has said nothing for ``expiry_s`` (heartbeats included)."""
    return link.child.running and not link.child.terminated_at and now - link.last_heard > expiry_s


def send_heartbeats(links: Iterable[ChildLink], now: float, interval_s: float, send: SendToChild) -> None:
    """A HEARTBEAT to each link the broker has sent nothing for an interval: any message counts."""
    for link in links:
        if now - link.last_sent >= interval_s:
            send(link.identity, protocol.HEARTBEAT, protocol.Heartbeat(), ())
            link.last_sent = now
