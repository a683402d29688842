"""Spawning, reaping and stopping the broker's children, in gunicorn's words.

Children are fresh interpreters (``python -m workers``, ``python -m gunicorn`` for the frontends), never forks
of the broker: a forked TensorFlow or ZeroMQ state is not safe to use. Each child learns the
broker's pid from TFBROKER_PARENT_PID and asks the kernel for SIGTERM when the broker dies
(tfbroker/runtime/process.py), so no child outlives it.

Each child runs in a session of its own: Ctrl-C in a terminal (SIGINT to the whole
foreground process group) and ``kill -TERM -- -PGID`` reach the broker alone, which stops
its children in order (frontends finish their requests, workers their batches). Signalled
with the broker, they would stop at once, mid-request, and look to the broker like crashes.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Sequence

from tfbroker.runtime.process import DUMP_SIGNAL, EXIT_BOOT_ERROR, EXIT_MODEL_LOAD_ERROR, PARENT_PID_ENV
from tfbroker.wire.security import CLIENT_SECRET_KEY_ENV, SERVER_KEY_ENV

log = logging.getLogger("tfbroker.supervisor")

RESTART_BACKOFF_MAX_S = 30.0
# A child that ran this long before it died restarts without delay.
STABLE_AFTER_S = 60.0


@dataclass(slots=True)
class Child:
    """One supervised process and what it takes to start it again."""

    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    pass_fds: Sequence[int] = ()
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restarts: int = 0
    restart_at: float = 0.0  # when to start it again after an exit; 0 = not scheduled
    terminated_at: float = 0.0  # when it was told to stop for not answering; 0 = not told

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None


def curve_env(secret_key_file: str) -> dict[str, str]:
    """Children reach a CURVE broker with the broker's own key pair."""
    return {CLIENT_SECRET_KEY_ENV: secret_key_file, SERVER_KEY_ENV: secret_key_file} if secret_key_file else {}


def spawn_child(child: Child) -> None:
    env = {**os.environ, **child.env, PARENT_PID_ENV: str(os.getpid())}
    child.process = subprocess.Popen(
        [sys.executable, *child.argv], env=env, pass_fds=tuple(child.pass_fds),
        stdin=subprocess.DEVNULL, close_fds=True, start_new_session=True)
    child.started_at = time.monotonic()
    child.restart_at = 0.0
    child.terminated_at = 0.0
    log.debug("spawned %s as pid %d", child.name, child.process.pid)


def reap_children(children: Sequence[Child]) -> list[tuple[Child, int]]:
    """Children that have exited since the last call, with their exit codes."""
    exited = []
    for child in children:
        if child.process is not None and child.process.returncode is None:
            code = child.process.poll()
            if code is not None:
                exited.append((child, code))
    return exited


def schedule_restart(child: Child, now: float) -> None:
    """Back off exponentially while a child keeps dying young."""
    if now - child.started_at >= STABLE_AFTER_S:
        child.restarts = 0
    delay = 0.0 if child.restarts == 0 else min(2.0 ** (child.restarts - 1), RESTART_BACKOFF_MAX_S)
    child.restarts += 1
    child.restart_at = now + delay


def restartable(code: int) -> bool:
    """Exit codes that say a restart would fail the same way."""
    return code not in (EXIT_BOOT_ERROR, EXIT_MODEL_LOAD_ERROR)


def terminate_child(child: Child, reason: str, *, kill: bool = False, dump: bool = True) -> None:
    """For a child that stopped answering: SIGUSR1 (``dump``: its faulthandler writes where
    it is stuck: tfbroker/runtime/process.py) and SIGTERM first, SIGKILL (``kill``) once the
    grace time has passed."""
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
