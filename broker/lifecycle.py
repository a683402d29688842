"""One version's lifecycle: a pure state machine, the only code that changes a version's state.

A version has up to two parts: its model in a worker process, and, when the version ships a
``assets.extra/lookups.json``, its lookup tables in the I/O batchers. The machine is fed events
(the policy's load or unload, worker READY or exit, tables loaded or failed, drained, the
unload grace running out) and answers with the actions the broker carries out (spawn or
restart the worker, load or unload the tables, fail the requests it holds, tell the worker to
go, terminate it). It never touches a process or a socket, so every path (swaps, restarts,
failed loads, shutdown) is tested without one (tests/broker/test_lifecycle.py).

    START ──Load──> LOADING ──worker READY and tables loaded──> AVAILABLE
                      │  ▲                                          │
     load error,      │  └──── worker died or went silent ──────────┤ (restarts; tables stay)
     tables failed    │                                             │
                      ▼                    UnloadAsked              ▼
                     (error) ──> UNLOADING <────────────────────────┘
                                   │  no admissions; once Drained (no request in any
                                   │  stage) the worker is told to go, terminated after
                                   │  the grace time
                                   ▼
                                  END  (worker gone, tables unloaded; ``error`` says why a
                                        load failed: such a version is not retried)
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from broker.versions import VersionState

S = VersionState


class Worker(enum.Enum):
    """The worker process of a version, as the machine knows it."""

    NONE = "none"  # never started, or gone for good
    STARTING = "starting"  # spawned, not READY yet
    RESTARTING = "restarting"  # exited; the supervisor starts it again after its back-off
    READY = "ready"
    LEAVING = "leaving"  # told to go (DISCONNECT or SIGTERM); the exit will follow


# --- events ---

@dataclass(frozen=True, slots=True)
class Load:
    pass


@dataclass(frozen=True, slots=True)
class WorkerStarted:
    """The supervisor started the process again after a restart's back-off."""


@dataclass(frozen=True, slots=True)
class WorkerReady:
    pass


@dataclass(frozen=True, slots=True)
class WorkerExited:
    code: int
    restartable: bool  # False: a restart would fail the same way (EXIT_MODEL_LOAD_ERROR, …)
    error: str = ""  # what the worker said before it went (DISCONNECT), if anything


@dataclass(frozen=True, slots=True)
class WorkerSilent:
    reason: str  # no heartbeat, or not ready in time
    load_error: str = ""  # set when it never became READY: the version's load failed


@dataclass(frozen=True, slots=True)
class TablesLoaded:
    pass


@dataclass(frozen=True, slots=True)
class TablesFailed:
    error: str


@dataclass(frozen=True, slots=True)
class UnloadAsked:
    pass


@dataclass(frozen=True, slots=True)
class Drained:
    """No request of the version is left in any stage (lookup queue, lookups in flight, model
    queue, batches in flight)."""


@dataclass(frozen=True, slots=True)
class GraceExpired:
    """The worker was told to go ``shutdown_grace_s`` ago and is still there."""


Event = (Load | WorkerStarted | WorkerReady | WorkerExited | WorkerSilent | TablesLoaded | TablesFailed
         | UnloadAsked | Drained | GraceExpired)


# --- actions ---

@dataclass(frozen=True, slots=True)
class SpawnWorker:
    pass


@dataclass(frozen=True, slots=True)
class RestartWorker:
    """Start it again after the supervisor's back-off."""


@dataclass(frozen=True, slots=True)
class CancelRestart:
    pass


@dataclass(frozen=True, slots=True)
class Disconnect:
    """Ask the worker to go after the batches in hand."""


@dataclass(frozen=True, slots=True)
class Terminate:
    reason: str


@dataclass(frozen=True, slots=True)
class LoadTables:
    pass


@dataclass(frozen=True, slots=True)
class UnloadTables:
    pass


@dataclass(frozen=True, slots=True)
class FailRequests:
    """Answer every request the version holds with 503 and this message."""

    message: str


@dataclass(frozen=True, slots=True)
class BecameAvailable:
    pass


@dataclass(frozen=True, slots=True)
class Ended:
    pass


Action = (SpawnWorker | RestartWorker | CancelRestart | Disconnect | Terminate | LoadTables | UnloadTables
          | FailRequests | BecameAvailable | Ended)


class Lifecycle:
    """The state of one version; ``handle(event)`` is the only way to change it."""

    __slots__ = ("name", "needs_tables", "state", "error", "worker", "tables_ready")

    def __init__(self, name: str, needs_tables: bool = False) -> None:
        self.name = name  # "model version N", for messages
        self.needs_tables = needs_tables
        self.state = S.START
        self.error = ""
        self.worker = Worker.NONE
        self.tables_ready = False

    @property
    def failed(self) -> bool:
        return self.state is S.END and bool(self.error)

    def handle(self, event: Event) -> list[Action]:
        """The actions ``event`` calls for; an event that means nothing in the current state
        (a late READY, a second unload) changes nothing and asks for nothing."""
        state = self.state
        if state is S.END:
            return []
        if isinstance(event, Load):
            return self._load() if state is S.START else []
        if isinstance(event, UnloadAsked):
            return self._unload()
        if isinstance(event, WorkerStarted):
            if self.worker is Worker.RESTARTING:
                self.worker = Worker.STARTING
            return []
        if isinstance(event, WorkerReady):
            return self._worker_ready()
        if isinstance(event, TablesLoaded):
            self.tables_ready = True
            return self._maybe_available()
        if isinstance(event, TablesFailed):
            return self._fail_load(f"lookup tables failed to load: {event.error}") if state is S.LOADING else []
        if isinstance(event, WorkerExited):
            return self._worker_exited(event)
        if isinstance(event, WorkerSilent):
            return self._worker_silent(event)
        if isinstance(event, Drained):
            return self._drained()
        if isinstance(event, GraceExpired):
            return [Terminate("still running after unload")] if state is S.UNLOADING else []
        raise TypeError(f"not an event: {event!r}")

    # --- implementation ---

    def _load(self) -> list[Action]:
        self.state = S.LOADING
        self.worker = Worker.STARTING
        return [SpawnWorker(), LoadTables()] if self.needs_tables else [SpawnWorker()]

    def _maybe_available(self) -> list[Action]:
        if self.state is S.LOADING and self.worker is Worker.READY and (self.tables_ready or not self.needs_tables):
            self.state = S.AVAILABLE
            self.error = ""
            return [BecameAvailable()]
        return []

    def _worker_ready(self) -> list[Action]:
        if self.worker is Worker.LEAVING:
            return []
        self.worker = Worker.READY
        return self._maybe_available()

    def _unload(self) -> list[Action]:
        if self.state is S.START:
            self.state = S.END
            return [Ended()]
        if self.state is S.UNLOADING:
            return []
        was = self.state
        self.state = S.UNLOADING
        if was is S.LOADING:  # nothing admitted yet: no need to wait
            return self._send_worker_away("unloaded while loading")
        return []  # AVAILABLE: new requests go elsewhere; the worker goes once Drained

    def _drained(self) -> list[Action]:
        if self.state is not S.UNLOADING or self.worker is Worker.LEAVING:
            return []
        return self._send_worker_away("unloaded")

    def _send_worker_away(self, reason: str) -> list[Action]:
        if self.worker is Worker.READY:
            self.worker = Worker.LEAVING
            return [Disconnect()]
        if self.worker is Worker.STARTING:
            self.worker = Worker.LEAVING
            return [Terminate(reason)]
        return self._end([CancelRestart()])  # waiting for a restart: nothing to stop

    def _fail_load(self, error: str) -> list[Action]:
        """A part failed to load: the version ends with ``error``, once its worker is gone."""
        self.error = error
        self.state = S.UNLOADING
        return self._send_worker_away(error)

    def _worker_exited(self, event: WorkerExited) -> list[Action]:
        if self.state is S.UNLOADING or self.worker is Worker.LEAVING:
            return self._end([FailRequests(f"{self.name} was unloaded")])
        if self.state is S.LOADING and not event.restartable:
            self.error = self.error or event.error or f"worker exited with code {event.code} while loading"
            return self._end([FailRequests(f"{self.name} failed to load")])
        self.state = S.LOADING  # takes no requests until its worker is back
        self.worker = Worker.RESTARTING
        return [FailRequests(f"{self.name} is unavailable: its worker exited (code {event.code}) "
                             "and is restarting"), RestartWorker()]

    def _worker_silent(self, event: WorkerSilent) -> list[Action]:
        actions: list[Action] = [Terminate(event.reason)]
        if self.state is S.LOADING and event.load_error:
            self.error = event.load_error  # the exit that follows ends the version
            self.state = S.UNLOADING
            self.worker = Worker.LEAVING
        elif self.state is S.AVAILABLE:
            self.state = S.LOADING
            actions.append(FailRequests(f"{self.name} is unavailable: its worker stopped answering "
                                        "and is restarting"))
        if self.worker is Worker.READY:
            self.worker = Worker.STARTING
        return actions

    def _end(self, actions: list[Action]) -> list[Action]:
        self.state = S.END
        self.worker = Worker.NONE
        if self.needs_tables:
            actions.append(UnloadTables())
        actions.append(Ended())
        return actions
