"""One version's lifecycle: a pure state machine, the only code that changes a version's state.

A version has up to two parts: its model in worker processes (one replica per device,
``--devices``), and, when the version ships a
``assets.extra/lookups.json``, its lookup tables in the I/O batchers. The machine is fed events
(the policy's load or unload, worker READY or exit, tables loaded or failed, drained, the
unload grace running out) and answers with the actions the broker carries out (spawn or
restart the worker, load or unload the tables, fail the requests it holds, tell the worker to
go, terminate it). It never touches a process or a socket, so every path (swaps, restarts,
failed loads, shutdown) is tested without one (tests/unit/broker/test_lifecycle.py).

    START ──LoadAsked──> LOADING ──worker READY and tables loaded──> AVAILABLE
                      │  ▲                                          │
     load error,      │  └──── worker died or went silent ──────────┤ (restarts; tables stay)
     tables failed    │                                             │
                      ▼                    UnloadAsked              ▼
                     (error) ──> UNLOADING <────────────────────────┘
                                   │  no admissions; once Drained (no request in any
                                   │  stage) the worker is told to go, terminated after
                                   │  the grace time
                                   ▼
                                  END  (workers gone, tables unloaded; ``error`` says why a
                                        load failed: such a version is not retried)

With several replicas a version becomes AVAILABLE when every replica is READY, and stays
AVAILABLE while any one is: a replica that dies or goes silent is restarted, and its batches
in flight go to the others (Requeue) instead of failing. Only when no replica is left
READY does the version go back to LOADING and its requests get 503 — except when a worker
died running batches: then a request may have killed it, so the version stays AVAILABLE,
the worker restarts at once, and its batches' requests run one by one to find it (Requeue
with ``crashed``). Worker events and actions name their replica (0 when there is one).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from broker.versions import VersionState

S = VersionState


class Replica(enum.Enum):
    """A version's worker process on one device, as the machine knows it: the one record of
    whether it takes batches (ServedVersion.ready_links)."""

    NONE = "none"  # never started, or gone for good
    STARTING = "starting"  # spawned, not READY yet
    RESTARTING = "restarting"  # exited; the supervisor starts it again after its back-off
    READY = "ready"
    LEAVING = "leaving"  # told to go (DISCONNECT or SIGTERM); the exit will follow


# --- events ---

@dataclass(frozen=True, slots=True)
class LoadAsked:
    """The version policy (or an operator) wants this version served."""


@dataclass(frozen=True, slots=True)
class WorkerStarted:
    """The supervisor started the process again after a restart's back-off."""

    replica: int = 0


@dataclass(frozen=True, slots=True)
class WorkerReady:
    replica: int = 0


@dataclass(frozen=True, slots=True)
class WorkerExited:
    code: int
    restartable: bool  # False: a restart would fail the same way (EXIT_MODEL_LOAD_ERROR, …)
    error: str = ""  # what the worker said before it went (DISCONNECT), if anything
    replica: int = 0
    on_requests: bool = False  # it died running batches: one of their requests may have killed it


@dataclass(frozen=True, slots=True)
class WorkerSilent:
    reason: str  # no heartbeat, or not ready in time
    load_error: str = ""  # set when it never became READY: the version's load failed
    replica: int = 0


@dataclass(frozen=True, slots=True)
class TablesReady:
    """Every I/O batcher that is up holds the version's lookup tables."""


@dataclass(frozen=True, slots=True)
class TablesFailed:
    error: str


@dataclass(frozen=True, slots=True)
class LoadFailed:
    """Something the version needs besides its worker and tables cannot be used (its own
    batching_params.pbtxt): the load fails with ``error``."""

    error: str


@dataclass(frozen=True, slots=True)
class UnloadAsked:
    pass


@dataclass(frozen=True, slots=True)
class StopAdmissions:
    """`broker.ctl drain`: an AVAILABLE version stays loaded but takes no new requests."""


@dataclass(frozen=True, slots=True)
class ResumeAdmissions:
    """`broker.ctl load` of a draining version: it takes requests again."""


@dataclass(frozen=True, slots=True)
class Drained:
    """No request of the version is left in any stage (lookup queue, lookups in flight, model
    queue, batches in flight)."""


@dataclass(frozen=True, slots=True)
class GraceExpired:
    """The worker was told to go ``shutdown_grace_s`` ago and is still there."""


Event = (LoadAsked | WorkerStarted | WorkerReady | WorkerExited | WorkerSilent | TablesReady | TablesFailed
         | LoadFailed | UnloadAsked | StopAdmissions | ResumeAdmissions | Drained | GraceExpired)


# --- actions ---

@dataclass(frozen=True, slots=True)
class SpawnWorker:
    replica: int = 0


@dataclass(frozen=True, slots=True)
class RestartWorker:
    """Start it again after the supervisor's back-off (``at_once``: now, and the back-off
    does not grow: it died on a request, which says nothing of the next start)."""

    replica: int = 0
    at_once: bool = False


@dataclass(frozen=True, slots=True)
class CancelRestart:
    replica: int = 0


@dataclass(frozen=True, slots=True)
class DisconnectWorker:
    """Ask the worker to go after the batches in hand."""

    replica: int = 0


@dataclass(frozen=True, slots=True)
class Terminate:
    reason: str
    replica: int = 0
    stuck: bool = True  # it stopped answering: it writes its stacks first (SIGUSR1)


@dataclass(frozen=True, slots=True)
class Requeue:
    """The replica's batches in flight go back to the front of the queue, for the other
    replicas (each request at most once: a batch that kills two workers is failed).
    ``crashed``: the worker died running them, so they are never re-run as they were: they
    are run again one request at a time, to find the one that kills (broker/inflight.py)."""

    replica: int
    crashed: bool = False


@dataclass(frozen=True, slots=True)
class LoadTables:
    pass


@dataclass(frozen=True, slots=True)
class UnloadTables:
    pass


@dataclass(frozen=True, slots=True)
class FailRequests:
    """Answer every request the version holds with 503 and this message (only the batches in
    flight on ``replica``, when given)."""

    message: str
    replica: int | None = None


@dataclass(frozen=True, slots=True)
class BecameAvailable:
    pass


@dataclass(frozen=True, slots=True)
class Ended:
    pass


Action = (SpawnWorker | RestartWorker | CancelRestart | DisconnectWorker | Terminate | Requeue | LoadTables
          | UnloadTables | FailRequests | BecameAvailable | Ended)


class Lifecycle:
    """The state of one version; ``handle(event)`` is the only way to change it."""

    __slots__ = ("name", "needs_tables", "state", "error", "workers", "tables_ready", "served_before", "draining")

    def __init__(self, name: str, needs_tables: bool = False, replicas: int = 1) -> None:
        if replicas < 1:
            raise ValueError(f"a version needs at least one replica, got {replicas}")
        self.name = name  # "model version N", for messages
        self.needs_tables = needs_tables
        self.state = S.START
        self.error = ""
        self.workers = [Replica.NONE] * replicas
        self.tables_ready = False
        self.served_before = False  # once AVAILABLE, one READY replica is enough to serve again
        self.draining = False  # AVAILABLE but taking no new requests (StopAdmissions)

    @property
    def worker(self) -> Replica:
        """The first replica's state (the only one, unless --devices names several)."""
        return self.workers[0]

    @property
    def failed(self) -> bool:
        return self.state is S.END and bool(self.error)

    def handle(self, event: Event) -> list[Action]:
        """The actions ``event`` calls for; an event that means nothing in the current state
        (a late READY, a second unload) changes nothing and asks for nothing."""
        state = self.state
        if state is S.END:
            return []
        if isinstance(event, LoadAsked):
            return self._load() if state is S.START else []
        if isinstance(event, UnloadAsked):
            return self._unload()
        if isinstance(event, WorkerStarted):
            if self.workers[event.replica] is Replica.RESTARTING:
                self.workers[event.replica] = Replica.STARTING
            return []
        if isinstance(event, WorkerReady):
            return self._worker_ready(event.replica)
        if isinstance(event, TablesReady):
            self.tables_ready = True
            return self._maybe_available()
        if isinstance(event, LoadFailed):
            return self._fail_load(event.error) if state is S.LOADING else []
        if isinstance(event, TablesFailed):
            return self._fail_load(f"lookup tables failed to load: {event.error}") if state is S.LOADING else []
        if isinstance(event, WorkerExited):
            return self._worker_exited(event)
        if isinstance(event, WorkerSilent):
            return self._worker_silent(event)
        if isinstance(event, StopAdmissions):
            self.draining = state is S.AVAILABLE
            return []
        if isinstance(event, ResumeAdmissions):
            self.draining = False
            return []
        if isinstance(event, Drained):
            return self._drained()
        if isinstance(event, GraceExpired):
            if state is not S.UNLOADING:
                return []
            return [Terminate("still running after unload", r) for r, w in enumerate(self.workers)
                    if w is not Replica.NONE]
        raise TypeError(f"not an event: {event!r}")

    # --- implementation ---

    def _load(self) -> list[Action]:
        self.state = S.LOADING
        self.workers = [Replica.STARTING] * len(self.workers)
        actions: list[Action] = [SpawnWorker(r) for r in range(len(self.workers))]
        return [*actions, LoadTables()] if self.needs_tables else actions

    def _ready_count(self, but: int | None = None) -> int:
        return sum(w is Replica.READY for r, w in enumerate(self.workers) if r != but)

    def _maybe_available(self) -> list[Action]:
        ready = self._ready_count()
        enough = ready == len(self.workers) or (self.served_before and ready > 0)
        if self.state is S.LOADING and enough and (self.tables_ready or not self.needs_tables):
            self.state = S.AVAILABLE
            self.error = ""
            self.served_before = True
            return [BecameAvailable()]
        return []

    def _worker_ready(self, replica: int) -> list[Action]:
        if self.workers[replica] is Replica.LEAVING:
            return []
        self.workers[replica] = Replica.READY
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
            return self._send_workers_away("unloaded while loading")
        return []  # AVAILABLE: new requests go elsewhere; the workers go once Drained

    def _drained(self) -> list[Action]:
        if self.state is not S.UNLOADING:
            return []
        return self._send_workers_away("unloaded")

    def _send_workers_away(self, reason: str, actions: list[Action] | None = None) -> list[Action]:
        """Every replica still there is told to go (READY), terminated (STARTING), or not
        restarted (RESTARTING); the version ends once none is left."""
        actions = actions or []
        for replica, worker in enumerate(self.workers):
            if worker is Replica.READY:
                self.workers[replica] = Replica.LEAVING
                actions.append(DisconnectWorker(replica))
            elif worker is Replica.STARTING:
                self.workers[replica] = Replica.LEAVING
                actions.append(Terminate(reason, replica, stuck=False))
            elif worker is Replica.RESTARTING:
                self.workers[replica] = Replica.NONE
                actions.append(CancelRestart(replica))
        if all(w is Replica.NONE for w in self.workers):
            return self._end(actions)
        return actions

    def _fail_load(self, error: str) -> list[Action]:
        """A part failed to load: the version ends with ``error``, once its workers are gone."""
        self.error = error
        self.state = S.UNLOADING
        return self._send_workers_away(error)

    def _worker_exited(self, event: WorkerExited) -> list[Action]:
        replica, was = event.replica, self.workers[event.replica]
        if self.state is S.UNLOADING or was is Replica.LEAVING:
            self.workers[replica] = Replica.NONE
            if all(w is Replica.NONE for w in self.workers):
                return self._end([FailRequests(f"{self.name} was unloaded")])
            if self._ready_count() and was is not Replica.LEAVING:
                return [Requeue(replica)]  # it died while the others drain the version
            return [FailRequests(f"{self.name} was unloaded", replica)]
        if self.state is S.LOADING and not event.restartable:
            self.workers[replica] = Replica.NONE
            error = self.error or event.error or f"worker exited with code {event.code} while loading"
            if all(w is Replica.NONE for w in self.workers):
                self.error = error
                return self._end([FailRequests(f"{self.name} failed to load")])
            return self._fail_load(error)
        if not event.restartable and self._ready_count(but=replica):
            # This replica cannot come back (its model no longer loads here); the others serve.
            self.workers[replica] = Replica.NONE
            return [Requeue(replica)]
        if event.on_requests and event.restartable and self.state is S.AVAILABLE:
            # Likely killed by a request (a kernel that aborts on its values): the version stays
            # AVAILABLE, its requests wait for a replica (the others, or this one, back at
            # once), and the requests it held run one at a time until the one that kills is found.
            self.workers[replica] = Replica.RESTARTING
            return [Requeue(replica, crashed=True), RestartWorker(replica, at_once=True)]
        self.workers[replica] = Replica.RESTARTING
        if self._ready_count():
            return [Requeue(replica), RestartWorker(replica)]
        self.state = S.LOADING  # takes no requests until a worker is back
        return [FailRequests(f"{self.name} is unavailable: its worker exited (code {event.code}) "
                             "and is restarting"), RestartWorker(replica)]

    def _worker_silent(self, event: WorkerSilent) -> list[Action]:
        replica = event.replica
        actions: list[Action] = [Terminate(event.reason, replica)]
        if self.state is S.LOADING and event.load_error:
            self.workers[replica] = Replica.LEAVING  # the exit that follows ends it
            self.error = event.load_error
            self.state = S.UNLOADING
            return self._send_workers_away(event.load_error, actions)
        if self.workers[replica] is Replica.READY:
            self.workers[replica] = Replica.STARTING  # so that its exit restarts it
            if self._ready_count():
                actions.append(Requeue(replica))
            elif self.state is S.AVAILABLE:
                self.state = S.LOADING
                actions.append(FailRequests(f"{self.name} is unavailable: its worker stopped answering "
                                            "and is restarting"))
        return actions

    def _end(self, actions: list[Action]) -> list[Action]:
        self.state = S.END
        self.draining = False
        self.workers = [Replica.NONE] * len(self.workers)
        if self.needs_tables:
            actions.append(UnloadTables())
        actions.append(Ended())
        return actions
