"""The supervisor's one loop with fake children (no processes): exit codes per kind, back-off,
escalation from silence to SIGKILL, nothing restarted while stopping; and each real kind's
rule for exit codes."""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass, field
from typing import Any

import pytest

from broker import lifecycle as lc
from broker.config import BatchingParameters, ServerConfig
from broker.fleet import FORK, SPAWN, WAIT, Fleet, start_mode
from broker.frontends import Frontends
from broker.inflight import InFlight
from broker.links import ChildLink, WorkerLink
from broker.lookups import LookupStage
from broker.supervisor import RESTART_BACKOFF_MAX_S, STABLE_AFTER_S, Child, Speaker, Supervisor, terminate_child
from broker.zygote import READY, STARTING, Zygote
from tests.unit.broker.shell import add_link, model_with
from tfbroker.runtime.process import (DUMP_SIGNAL, EXIT_BOOT_ERROR, EXIT_CONFIG_ERROR, EXIT_FAULT,
                                      EXIT_MODEL_LOAD_ERROR)
from tfbroker.wire import protocol


class FakeProcess:
    """A child process as Popen shows it: it exits when told to (``exit``), and keeps the
    signals it was sent."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._exit: int | None = None
        self.signals: list[int] = []

    def exit(self, code: int) -> None:
        self._exit = code

    def poll(self) -> int | None:
        if self.returncode is None and self._exit is not None:
            self.returncode = self._exit
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        self._exit = -signal.SIGTERM if self._exit is None else self._exit
        return self.poll() or 0

    def send_signal(self, sig: int) -> None:
        self.signals.append(sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


@dataclass
class FakeKind:
    """A kind whose exit codes 0 and EXIT_CONFIG_ERROR do not restart; it records what it is told."""

    kind: str = "fake"
    exits: list[tuple[str, int]] = field(default_factory=list)
    starts: list[str] = field(default_factory=list)
    silences: list[bytes] = field(default_factory=list)
    links: list[ChildLink] = field(default_factory=list)
    pids: int = 100

    def restarts(self, child: Child, code: int) -> bool:
        return code not in (0, EXIT_CONFIG_ERROR)

    def exited(self, child: Child, code: int, now: float) -> None:
        self.exits.append((child.name, code))

    def start(self, child: Child, now: float) -> None:
        self.starts.append(child.name)
        self.pids += 1
        child.process = FakeProcess(self.pids)
        child.started_at = now

    def speaking(self) -> list[Speaker]:
        return [link for link in self.links if link.child.running]

    def silent(self, link: Speaker, now: float) -> None:
        self.silences.append(link.identity)


class Sent:
    def __init__(self) -> None:
        self.messages: list[tuple[bytes, bytes]] = []

    def __call__(self, identity: bytes, command: bytes, header: protocol.Header, frames: Any) -> None:
        self.messages.append((identity, command))


def supervised(*names: str, started_at: float = 0.0) -> tuple[Supervisor, FakeKind, list[Child], Sent]:
    sent = Sent()
    supervisor = Supervisor(kill_grace_s=3.0, heartbeat_interval_s=1.0, heartbeat_expiry_s=3.0, send=sent)
    kind = FakeKind()
    supervisor.add_kind(kind)
    children = []
    for number, name in enumerate(names):
        child = Child(name=name, argv=[], process=FakeProcess(number + 1), started_at=started_at)
        supervisor.watch(child, kind)
        children.append(child)
    return supervisor, kind, children, sent


def exit_now(child: Child, code: int) -> None:
    assert isinstance(child.process, FakeProcess)
    child.process.exit(code)


def test_an_exit_is_told_to_its_kind_and_restarts_only_for_the_codes_it_names(caplog: Any) -> None:
    supervisor, kind, (a, b, c), _ = supervised("a", "b", "c")
    exit_now(a, EXIT_FAULT)
    exit_now(b, EXIT_CONFIG_ERROR)
    exit_now(c, 0)
    with caplog.at_level(logging.ERROR, "tfbroker.supervisor"):
        supervisor.tick(10.0)
    assert sorted(kind.exits) == [("a", EXIT_FAULT), ("b", EXIT_CONFIG_ERROR), ("c", 0)]
    assert kind.starts == ["a"]  # its first restart comes at once
    assert a.running and not b.running and not c.running
    restarting = [r.getMessage() for r in caplog.records if "restarting" in r.getMessage()]
    assert restarting == ["a (pid 1) exited with code 1; restarting in 0 s"], "only what restarts says so"
    supervisor.tick(11.0)
    assert kind.starts == ["a"] and len(kind.exits) == 3, "an exit is reported once"


def test_a_child_that_keeps_dying_young_backs_off_doubling_up_to_the_cap() -> None:
    supervisor, kind, (child,), _ = supervised("a", started_at=0.0)
    now, delays = 1.0, []
    for _ in range(8):
        exit_now(child, EXIT_FAULT)
        supervisor.tick(now)
        delays.append(child.restart_at - now if child.restart_at else 0.0)
        now = max(now, child.restart_at) + 0.5  # dies half a second after each start
        supervisor.tick(now - 0.5)
    assert delays == [0.0, 1.0, 2.0, 4.0, 8.0, 16.0, RESTART_BACKOFF_MAX_S, RESTART_BACKOFF_MAX_S]
    # One that ran long enough before it died starts again at once.
    now += STABLE_AFTER_S
    exit_now(child, EXIT_FAULT)
    supervisor.tick(now)
    assert child.running and child.restarts == 1


def test_nothing_restarts_while_stopping() -> None:
    supervisor, kind, (a, b), _ = supervised("a", "b")
    exit_now(a, EXIT_FAULT)
    supervisor.tick(1.0)
    exit_now(a, EXIT_FAULT)
    supervisor.tick(1.1)  # a's second restart is due in a second
    assert a.restart_at > 1.1
    supervisor.stopping = True
    exit_now(b, EXIT_FAULT)
    supervisor.tick(5.0)
    assert kind.starts == ["a"] and not a.running and not b.running
    assert ("b", EXIT_FAULT) in kind.exits, "an exit while stopping is still told to its kind"


def test_silence_gets_a_stack_dump_and_sigterm_then_sigkill_after_the_grace_time() -> None:
    supervisor, kind, (child,), sent = supervised("a")
    link = ChildLink(child, b"a", last_heard=0.0)
    kind.links.append(link)
    supervisor.tick(0.5)
    assert not sent.messages
    supervisor.tick(1.0)
    assert sent.messages == [(b"a", protocol.HEARTBEAT)]
    supervisor.tick(1.5)
    assert len(sent.messages) == 1, "one heartbeat an interval"
    supervisor.tick(3.5)
    assert kind.silences == [b"a"]
    terminate_child(child, "no heartbeat")  # what every kind's silent() does
    assert isinstance(child.process, FakeProcess)
    assert child.process.signals == [DUMP_SIGNAL, signal.SIGTERM]
    child.terminated_at = 3.5
    supervisor.tick(6.0)
    assert kind.silences == [b"a"], "a child already told to stop is not silent again"
    assert child.process.signals[-1] == signal.SIGTERM
    supervisor.tick(6.6)  # past kill_grace_s
    assert child.process.signals[-1] == signal.SIGKILL


def test_each_kind_says_which_exit_codes_restart_it() -> None:
    config = ServerConfig()
    supervisor = Supervisor(kill_grace_s=3.0, heartbeat_interval_s=1.0, heartbeat_expiry_s=3.0, send=Sent())
    batching = BatchingParameters()
    child = Child(name="x", argv=[])
    lookups = LookupStage(config, InFlight(lambda *a: None, batching, enable_batching=True, max_timeout_ms=1000), Sent(), lambda *a: None, supervisor)
    iobatchers = lookups.processes
    assert iobatchers.restarts(child, EXIT_FAULT) and iobatchers.restarts(child, -signal.SIGKILL)
    assert not iobatchers.restarts(child, EXIT_BOOT_ERROR) and not iobatchers.restarts(child, EXIT_MODEL_LOAD_ERROR)
    zygote = Zygote(config, supervisor)
    assert zygote.restarts(child, -signal.SIGKILL) and zygote.restarts(child, EXIT_FAULT)
    assert not zygote.restarts(child, EXIT_BOOT_ERROR), "TensorFlow does not import: workers spawn from then on"
    frontends = Frontends(config, supervisor)
    assert frontends.restarts(child, 3) and frontends.restarts(child, -signal.SIGKILL)
    frontends.stop()
    assert not frontends.restarts(child, -signal.SIGTERM)
    fleet = Fleet(config, batching, Sent(), lambda *a: None, supervisor, zygote)
    assert not fleet.restarts(child, EXIT_FAULT), "a worker's version decides (WorkerExited)"


def test_a_worker_waits_for_the_zygotes_first_start_forks_after_and_spawns_once_a_fork_hung() -> None:
    supervisor = Supervisor(kill_grace_s=3.0, heartbeat_interval_s=1.0, heartbeat_expiry_s=3.0, send=Sent())
    zygote = Zygote(ServerConfig(), supervisor)
    _, served = model_with(1, state="loading")
    link = add_link(served)
    assert start_mode(link, None) == SPAWN
    zygote.state = STARTING
    assert start_mode(link, zygote) == WAIT
    zygote.state = READY
    assert start_mode(link, zygote) == FORK
    zygote.exited(zygote.child, -signal.SIGKILL, 1.0)
    zygote.state = STARTING  # restarting: not its first start, so no worker waits for it
    assert start_mode(link, zygote) == FORK  # and fork() answers False: the worker spawns
    assert not zygote.fork(link.child) and zygote.spawned_without == 1
    link.spawn_only = True
    zygote.state = READY
    assert start_mode(link, zygote) == SPAWN


def test_a_fork_not_ready_within_the_load_timeout_is_killed_and_started_again_as_a_fresh_interpreter() -> None:
    config = ServerConfig(worker_load_timeout_s=5.0)
    supervisor = Supervisor(kill_grace_s=3.0, heartbeat_interval_s=1.0, heartbeat_expiry_s=3.0, send=Sent())
    events: list[lc.Event] = []
    fleet = Fleet(config, BatchingParameters(), Sent(), lambda served, event, now: events.append(event), supervisor)
    _, served = model_with(1, state="loading")
    fleet.serving.append(served)
    link: WorkerLink = add_link(served)
    process = FakeProcess(7)
    link.child.process = process
    link.child.forked, link.child.started_at = True, 0.0
    fleet._owners[id(link.child)] = (served, link)  # as _spawn_worker records it
    supervisor.watch(link.child, fleet)
    fleet.manage(4.0)
    assert not events and not link.spawn_only and not process.signals
    fleet.manage(6.0)
    assert link.spawn_only and process.signals == [DUMP_SIGNAL, signal.SIGTERM]
    assert not events, "not the version's load failing: a retry as a fresh interpreter"
    process.exit(-signal.SIGTERM)
    supervisor.tick(6.5)
    assert events == [lc.WorkerExited(-signal.SIGTERM, True, "", replica=0, on_requests=False)]
    # A spawned worker that is not ready in time fails its version's load.
    link.child.forked, link.child.process, link.child.terminated_at = False, FakeProcess(8), 0.0
    events.clear()
    fleet.manage(20.0)
    assert [type(e) for e in events] == [lc.WorkerSilent] and "not ready after 5 s" in events[0].reason  # type: ignore[union-attr]


@pytest.mark.parametrize("code", [EXIT_FAULT, -signal.SIGKILL])
def test_a_worker_exit_goes_to_its_versions_lifecycle(code: int) -> None:
    supervisor = Supervisor(kill_grace_s=3.0, heartbeat_interval_s=1.0, heartbeat_expiry_s=3.0, send=Sent())
    events: list[lc.Event] = []
    fleet = Fleet(ServerConfig(), BatchingParameters(), Sent(), lambda served, event, now: events.append(event),
                  supervisor)
    _, served = model_with(1)
    fleet.serving.append(served)
    link = add_link(served)
    process = FakeProcess(9)
    link.child.process = process
    fleet._owners[id(link.child)] = (served, link)  # as _spawn_worker records it
    supervisor.watch(link.child, fleet)
    process.exit(code)
    supervisor.tick(1.0)
    assert events == [lc.WorkerExited(code, True, "", replica=0, on_requests=False)]
    assert not link.child.restart_at, "the lifecycle schedules the restart, not the supervisor"


def test_a_worker_told_to_go_while_it_waits_for_the_zygote_is_reported_gone_and_never_started() -> None:
    supervisor = Supervisor(kill_grace_s=3.0, heartbeat_interval_s=1.0, heartbeat_expiry_s=3.0, send=Sent())
    zygote = Zygote(ServerConfig(), supervisor)
    zygote.state = STARTING  # its first start: workers wait for it
    events: list[lc.Event] = []
    fleet = Fleet(ServerConfig(), BatchingParameters(), Sent(), lambda served, event, now: events.append(event),
                  supervisor, zygote)
    _, served = model_with(1, state="loading")
    fleet.spawn_worker(served, 0)
    link = served.link(0)
    assert link is not None and link.child.process is None, "waiting, not started"
    fleet.terminate_worker(served, 0, "its batching file cannot be used")
    fleet.manage(1.0)
    assert events == [lc.WorkerExited(-signal.SIGTERM, False, replica=0)]
    zygote.state = READY
    fleet.manage(2.0)
    assert link.child.process is None, "never started once the zygote is up"
