"""The broker's side of its children on the backend socket: one link per process (a model
worker replica or an I/O batcher), with when it and the broker last spoke (the supervisor's
heartbeats and silence: broker/supervisor.py).

What a link's readiness means is its owner's: a worker replica's is a state of its version's
lifecycle (broker/lifecycle.py), an I/O batcher's is its IoReady (broker/lookups.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

from broker.batching import Task
from broker.stats import VersionCounters
from broker.supervisor import Child, SendToChild

__all__ = ["ChildLink", "SendToChild", "WorkerLink"]


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
    # Each batch in flight: when it was sent, its processed rows, its version's counters (for
    # its stage latencies) and its traced requests' batch spans (broker/traces.py).
    sent: dict[int, tuple[float, int, VersionCounters, Sequence[Any]]] = field(default_factory=dict)
    disconnect_sent: float = 0.0  # when the broker told it to go (unload)
    batches: int = 0  # batches sent to this process
    load_failures: int = 0  # failed loads of this replica's version, retried (--max_num_load_retries)
    spawn_only: bool = False  # a fork of this replica hung in its load: it starts as a fresh interpreter
    isolating: int = 0  # the suspect batch it runs alone (Batch.suspect): it takes nothing else until answered

    def tasks(self) -> Iterator[Task]:
        """Every request in its batches in flight."""
        for _signature, tasks in self.in_flight.values():
            yield from tasks

    def take_in_flight(self) -> list[Task]:
        """Its batches' requests, which it will not answer (it died, or their version failed)."""
        tasks = list(self.tasks())
        self.in_flight.clear()
        self.sent.clear()
        self.isolating = 0
        return tasks
