"""The I/O batcher processes (``tfbroker: iobatcher``): one kind of the supervisor's children
(broker/supervisor.py), and which of them is up, ready and holding which tables.

The lookup stage (broker/lookups.py) owns what goes through them: the queues, the lookups in
flight, the versions whose tables they load. It hears here when one is lost (it died, or
stopped answering), fails that one's lookups in flight with 503, and loads every live
version's tables again once the restarted process says IoReady.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

from broker.config import ServerConfig
from broker.links import ChildLink, SendToChild
from broker.supervisor import Child, Speaker, Supervisor, curve_env, restartable, spawn_child, terminate_child
from tfbroker.runtime.flags import dataclass_to_argv
from tfbroker.runtime.settings import IoBatcherConfig
from tfbroker.wire import protocol

if TYPE_CHECKING:
    from broker.batching import Task
    from broker.models import ServedVersion


@dataclass(slots=True)
class IoLink(ChildLink):
    """The broker's side of one I/O batcher process."""

    index: int = 0
    ready: bool = False  # it said IoReady (and has not been lost since)
    loaded: set[tuple[str, int]] = field(default_factory=set)  # versions whose tables it holds
    # Lookup batches in flight: their version, tasks and traced requests' spans (broker/traces.py).
    in_flight: dict[int, tuple[ServedVersion, list[Task], Sequence[Any]]] = field(default_factory=dict)


class IoBatchers:
    kind = "iobatcher"

    def __init__(self, config: ServerConfig, send: SendToChild, supervisor: Supervisor, *,
                 on_lost: Callable[[IoLink, str], None]) -> None:
        self.config = config
        self._send_to = send
        self._supervisor = supervisor
        self._on_lost = on_lost
        self.links: list[IoLink] = []
        self._by_identity: dict[bytes, IoLink] = {}
        supervisor.add_kind(self)

    def start_all(self) -> None:
        """``--iobatchers`` processes, when the first version with lookups loads."""
        for index in range(self.config.iobatchers):
            link = IoLink(Child(name=f"iobatcher:{index}", argv=[]), index=index)
            self.links.append(link)
            self._supervisor.watch(link.child, self)
            self._spawn(link)

    def link(self, identity: bytes) -> IoLink | None:
        return self._by_identity.get(identity)

    def send(self, link: IoLink, command: bytes, header: protocol.Header, frames: Any = ()) -> None:
        self._send_to(link.identity, command, header, frames)

    def status(self) -> list[dict[str, Any]]:
        """Each I/O batcher: its process, whether it takes lookups, and the tables it holds."""
        return [{"index": link.index, "pid": link.child.pid if link.child.running else None, "ready": link.ready,
                 "restarts": link.child.restarts, "in_flight": len(link.in_flight),
                 "tables": [f"{model}:{version}" for model, version in sorted(link.loaded)]} for link in self.links]

    def pids(self) -> list[int]:
        return [link.child.pid for link in self.links if link.child.running and link.child.pid is not None]

    def stop(self) -> None:
        for link in self.links:
            if link.ready:
                self.send(link, protocol.DISCONNECT, protocol.Disconnect())
        self._supervisor.stop([link.child for link in self.links], self.config.shutdown_grace_s)

    # --- the supervisor's kind ---

    def restarts(self, child: Child, code: int) -> bool:
        return restartable(code)

    def exited(self, child: Child, code: int, now: float) -> None:
        link = self._link_of(child)
        if link is not None:
            self._lost(link, f"the I/O batcher exited (code {code})")

    def start(self, child: Child, now: float) -> None:
        link = self._link_of(child)
        if link is not None:
            self._spawn(link)

    def speaking(self) -> list[Speaker]:
        return [link for link in self.links if link.ready]

    def silent(self, link: Speaker, now: float) -> None:
        io_link = self._link_of(link.child)
        if io_link is not None:
            self._lost(io_link, "the I/O batcher stopped answering")
        terminate_child(link.child, f"no heartbeat for {now - link.last_heard:.1f} s")

    # --- implementation ---

    def _spawn(self, link: IoLink) -> None:
        config = IoBatcherConfig(
            index=link.index, backend_address=self.config.resolved_backend_address,
            heartbeat_interval_s=self.config.heartbeat_interval_s, heartbeat_liveness=self.config.heartbeat_liveness,
            redis_timeout_ms=self.config.lookup_redis_timeout_ms, log_level=self.config.log_level)
        link.child.argv = ["-m", "iobatcher", *dataclass_to_argv(config)]
        link.child.env = curve_env(self.config.curve_secret_key_file)
        self._by_identity.pop(link.identity, None)
        spawn_child(link.child)
        link.identity = f"iobatcher:{link.index}:{link.child.pid}".encode()
        link.ready = False
        link.loaded.clear()
        link.last_heard = time.monotonic()
        self._by_identity[link.identity] = link

    def _lost(self, link: IoLink, why: str) -> None:
        link.ready = False
        link.loaded.clear()
        self._on_lost(link, why)

    def _link_of(self, child: Child) -> IoLink | None:
        return next((link for link in self.links if link.child is child), None)
