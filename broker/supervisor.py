"""One loop over every child of the broker, in the style of gunicorn's arbiter.

Every tick (``Supervisor.tick``), for every kind of child (model workers, I/O batchers, the
frontends' gunicorn master, the zygote):

- reap: a child that exited is told to its kind (``ChildKind.exited``: the lifecycle events
  that follow), and started again after a back-off when its kind says its exit code restarts
  it (``ChildKind.restarts``) and the broker is not stopping;
- escalate: a child told to stop for not answering got SIGUSR1 (its faulthandler writes its
  stacks) and SIGTERM; it gets SIGKILL once ``--kill_grace_s`` has passed;
- restart what is due (``ChildKind.start``);
- heartbeats to every child that has spoken (``ChildKind.speaking``), and the silent ones told
  to their kind (``ChildKind.silent``).

Children are fresh interpreters (``python -m workers``, ``python -m gunicorn``…), or model
workers forked by the zygote (broker/zygote.py), which the broker adopts as their
subreaper: never forks of the broker itself, whose ZeroMQ state is not safe to copy. Each
child learns the broker's pid from TFBROKER_PARENT_PID and asks the kernel for SIGTERM when
the broker dies (tfbroker/runtime/process.py), so no child outlives it.

Each child runs in a session of its own: Ctrl-C in a terminal (SIGINT to the whole
foreground process group) and ``kill -TERM -- -PGID`` reach the broker alone, which stops
its children in order (frontends finish their requests, workers their batches). Signalled
with the broker, they would stop at once, mid-request, and look to the broker like crashes.
"""

from __future__ import annotations

import ctypes
import logging
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Protocol, Sequence

from tfbroker.runtime.process import DUMP_SIGNAL, EXIT_BOOT_ERROR, EXIT_MODEL_LOAD_ERROR, PARENT_PID_ENV
from tfbroker.wire import protocol
from tfbroker.wire.security import CLIENT_SECRET_KEY_ENV, SERVER_KEY_ENV

log = logging.getLogger("tfbroker.supervisor")

RESTART_BACKOFF_MAX_S = 30.0
# A child that ran this long before it died restarts without delay.
STABLE_AFTER_S = 60.0

# One message to a child on the backend socket: identity, command, header, frames.
SendToChild = Callable[[bytes, bytes, protocol.Header, Sequence[object]], None]


class Process(Protocol):
    """What the supervisor needs of a running child: subprocess.Popen, or AdoptedProcess."""

    pid: int
    returncode: int | None

    def poll(self) -> int | None: ...
    def wait(self, timeout: float | None = None) -> int: ...
    def send_signal(self, sig: int) -> None: ...
    def kill(self) -> None: ...


@dataclass(slots=True)
class Child:
    """One supervised process and what it takes to start it again."""

    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    pass_fds: Sequence[int] = ()
    process: Process | None = None
    started_at: float = 0.0
    restarts: int = 0
    restart_at: float = 0.0  # when to start it again after an exit; 0 = not scheduled
    terminated_at: float = 0.0  # when it was told to stop for not answering; 0 = not told
    fd_env: dict[str, int] = field(default_factory=dict)  # file descriptors it gets, by the variable naming each
    forked: bool = False  # forked by the zygote, not a fresh interpreter

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None


class Speaker(Protocol):
    """A child on the backend socket, as its link tells it (broker/links.py: ChildLink)."""

    child: Child
    identity: bytes
    last_heard: float
    last_sent: float


class ChildKind(Protocol):
    """What one kind of child tells the supervisor (its owner implements it)."""

    kind: str  # in the log: worker, iobatcher, frontends, zygote

    def restarts(self, child: Child, code: int) -> bool:
        """Whether this exit code restarts it (after the back-off). False where the kind's own
        lifecycle decides (a model worker's version): it calls Supervisor.schedule_restart."""
        ...

    def exited(self, child: Child, code: int, now: float) -> None:
        """The lifecycle events that follow an exit (its requests failed, its version told)."""
        ...

    def start(self, child: Child, now: float) -> None:
        """Start it again, its back-off over."""
        ...

    def speaking(self) -> Iterable[Speaker]:
        """The children that have spoken: they get heartbeats, and their silence counts."""
        ...

    def silent(self, link: Speaker, now: float) -> None:
        """A speaking child said nothing for the heartbeat expiry."""
        ...


def restartable(code: int) -> bool:
    """Exit codes that say a restart would fail the same way."""
    return code not in (EXIT_BOOT_ERROR, EXIT_MODEL_LOAD_ERROR)


class Supervisor:
    def __init__(self, *, kill_grace_s: float, heartbeat_interval_s: float, heartbeat_expiry_s: float,
                 send: SendToChild) -> None:
        self.kill_grace_s = kill_grace_s
        self.heartbeat_interval_s = heartbeat_interval_s
        self.heartbeat_expiry_s = heartbeat_expiry_s
        self._send = send
        self._kinds: list[ChildKind] = []
        self._children: dict[int, tuple[Child, ChildKind]] = {}  # id(child) -> child, its kind
        self.stopping = False  # nothing is started again from now on
        self.adopting = False  # the broker is its descendants' subreaper: strays are reaped here

    # --- who is watched ---

    def add_kind(self, kind: ChildKind) -> None:
        self._kinds.append(kind)

    def watch(self, child: Child, kind: ChildKind) -> None:
        """From now on ``child`` is reaped, escalated and restarted as its kind says."""
        self._children[id(child)] = (child, kind)

    def forget(self, child: Child) -> None:
        child.restart_at = 0.0
        self._children.pop(id(child), None)

    # --- the loop ---

    def tick(self, now: float) -> None:
        self.reap(now)
        self._escalate(now)
        self._restart_due(now)
        self._heartbeats(now)

    def schedule_restart(self, child: Child, now: float, *, delay_s: float | None = None) -> None:
        """Start it again after ``delay_s``, or after a back-off that doubles while it keeps dying young."""
        if delay_s is None:
            if now - child.started_at >= STABLE_AFTER_S:
                child.restarts = 0
            delay_s = 0.0 if child.restarts == 0 else min(2.0 ** (child.restarts - 1), RESTART_BACKOFF_MAX_S)
            child.restarts += 1
        child.restart_at = now + delay_s

    def stop(self, children: Sequence[Child], grace_s: float) -> None:
        """SIGTERM each running child, wait up to ``grace_s``, then SIGKILL what is left; none restarts."""
        for child in children:
            child.restart_at = 0.0
        stop_children(children, grace_s)

    # --- implementation ---

    def reap(self, now: float) -> None:
        for child, kind in list(self._children.values()):
            if child.process is None or child.process.returncode is not None:
                continue
            code = child.process.poll()
            if code is None:
                continue
            again = not self.stopping and kind.restarts(child, code)
            if again:
                self.schedule_restart(child, now)
                log.error("%s (pid %d) exited with code %d; restarting in %.0f s", child.name, child.pid, code,
                          child.restart_at - now)
            kind.exited(child, code, now)
        if self.adopting:
            reap_strays({c.pid for c, _ in self._children.values() if c.pid is not None})

    def _escalate(self, now: float) -> None:
        for child, _kind in list(self._children.values()):
            if child.running and child.terminated_at and now - child.terminated_at > self.kill_grace_s:
                terminate_child(child, "still running after SIGTERM", kill=True)

    def _restart_due(self, now: float) -> None:
        if self.stopping:
            return
        for child, kind in list(self._children.values()):
            if child.restart_at and now >= child.restart_at and not child.running:
                child.restart_at = 0.0
                kind.start(child, now)

    def _heartbeats(self, now: float) -> None:
        for kind in self._kinds:
            links = list(kind.speaking())
            for link in links:
                if now - link.last_sent >= self.heartbeat_interval_s:
                    self._send(link.identity, protocol.HEARTBEAT, protocol.Heartbeat(), ())
                    link.last_sent = now
            for link in links:
                if (link.child.running and not link.child.terminated_at
                        and now - link.last_heard > self.heartbeat_expiry_s):
                    kind.silent(link, now)


def curve_env(secret_key_file: str) -> dict[str, str]:
    """Children reach a CURVE broker with the broker's own key pair."""
    return {CLIENT_SECRET_KEY_ENV: secret_key_file, SERVER_KEY_ENV: secret_key_file} if secret_key_file else {}


def child_env(child: Child) -> dict[str, str]:
    """What a child's environment adds to the broker's (its fd_env aside)."""
    return {**child.env, PARENT_PID_ENV: str(os.getpid())}


def spawn_child(child: Child) -> None:
    """A fresh interpreter, in a session of its own."""
    fds = {name: str(fd) for name, fd in child.fd_env.items()}
    child.process = subprocess.Popen(
        [sys.executable, *child.argv], env={**os.environ, **child_env(child), **fds},
        pass_fds=(*child.pass_fds, *child.fd_env.values()), stdin=subprocess.DEVNULL, close_fds=True,
        start_new_session=True)
    started(child, forked=False)


def started(child: Child, *, forked: bool) -> None:
    child.started_at = time.monotonic()
    child.restart_at = 0.0
    child.terminated_at = 0.0
    child.forked = forked
    log.debug("%s %s as pid %s", "forked" if forked else "spawned", child.name, child.pid)


def terminate_child(child: Child, reason: str, *, kill: bool = False, dump: bool = True) -> None:
    """For a child that stopped answering: SIGUSR1 (``dump``: its faulthandler writes where
    it is stuck: tfbroker/runtime/process.py) and SIGTERM first, SIGKILL (``kill``) once the
    grace time has passed (Supervisor.tick)."""
    if child.running and child.process is not None:
        log.error("%s %s (pid %d): %s", "killing" if kill else "terminating", child.name, child.process.pid, reason)
        if dump and not kill:
            child.process.send_signal(DUMP_SIGNAL)
        child.process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        child.terminated_at = child.terminated_at or time.monotonic()


def stop_children(children: Sequence[Child], grace_s: float) -> None:
    """SIGTERM every running child, wait up to ``grace_s``, then SIGKILL what is left."""
    running = [c for c in children if c.running]
    for child in running:
        assert child.process is not None
        child.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for child in running:
        assert child.process is not None
        try:
            child.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s (pid %d) ignored SIGTERM for %.0f s; killing it", child.name,
                        child.process.pid, grace_s)
            child.process.kill()
            child.process.wait(timeout=5)


def terminate(process: subprocess.Popen[bytes], grace_s: float) -> int:
    """SIGTERM one process, SIGKILL it after ``grace_s``; its exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait(timeout=10)


# --- children the broker adopts: forked by the zygote, re-parented to the broker ---

_PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Orphaned descendants (the workers the zygote forks, whose own parent exits at once)
    become the broker's children, so it reaps them and reads their exit status, and they live
    on when the zygote dies. Linux only; False elsewhere."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return bool(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)


class AdoptedProcess:
    """A child the broker did not start itself but adopted as its subreaper: Popen's
    interface over ``waitpid`` and a pidfd (which names this process even once its pid is
    reused, so a late signal never reaches another)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._pidfd: int | None = os.pidfd_open(pid)

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                reaped, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # not ours after all: it cannot be waited for; take it as gone
                reaped, status = self.pid, 255 << 8
            if reaped:
                self.returncode = os.waitstatus_to_exitcode(status)
                self._close()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout or 0.0)
            if self._pidfd is not None:
                select.select([self._pidfd], [], [], left)  # readable once it has exited
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None and self._pidfd is not None:
            signal.pidfd_send_signal(self._pidfd, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def _close(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None


def reap_strays(known: set[int]) -> list[tuple[int, int]]:
    """As a subreaper the broker inherits every orphaned descendant (a frontend whose gunicorn
    master died, say): reap the ones it does not supervise, so none stays a zombie. Each
    exited child is looked at first without reaping it (WNOWAIT), so a supervised one keeps
    its status for its own handle."""
    reaped: list[tuple[int, int]] = []
    while True:
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return reaped
        if info is None or info.si_pid in known:
            return reaped
        try:
            _, status = os.waitpid(info.si_pid, 0)
        except ChildProcessError:
            return reaped
        reaped.append((info.si_pid, os.waitstatus_to_exitcode(status)))
        log.debug("reaped pid %d (exit code %d), which the broker adopted", *reaped[-1])
