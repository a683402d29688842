"""The broker's side of the zygote (``tfbroker: zygote``, workers/zygote.py): one process
that imported TensorFlow and the worker's code, and forks every model worker.

It is one more kind of the supervisor's children: started with the broker, restarted with
back-off when it dies. While it is down, workers start as fresh interpreters, so a broken
zygote never stops a model from loading; while it makes its first start, workers wait for
it (up to ZYGOTE_START_TIMEOUT_S), since twenty forks cost less than twenty imports.

Asking for a fork is one round trip on its channel (tfbroker/runtime/forking.py), from the
broker's loop, bounded by FORK_TIMEOUT_S: a zygote that does not answer in time is
terminated and the worker spawned. ``--worker_start=spawn`` runs no zygote at all.
"""

from __future__ import annotations

import itertools
import logging
import select
import socket
import time
from typing import Any, Iterable

from broker.config import ServerConfig
from broker.supervisor import AdoptedProcess, Child, Speaker, Supervisor, child_env, spawn_child, started, terminate_child
from tfbroker.runtime import forking
from tfbroker.runtime.process import EXIT_BOOT_ERROR, EXIT_CONFIG_ERROR

log = logging.getLogger("tfbroker.zygote")

ZYGOTE_START_TIMEOUT_S = 120.0  # its imports, on a loaded machine; then workers spawn without it
FORK_TIMEOUT_S = 5.0  # one fork request answered; a fork of a large process takes milliseconds

STARTING, READY, DOWN = "starting", "ready", "down"


class Zygote:
    kind = "zygote"

    def __init__(self, config: ServerConfig, supervisor: Supervisor) -> None:
        self._config = config
        self._supervisor = supervisor
        self.child = Child(name="zygote", argv=["-m", "workers.zygote", f"--log_level={config.log_level}"])
        self._sock: socket.socket | None = None
        self.state = DOWN
        self._first_start = True
        self.report: dict[str, Any] = {}  # its own, at start (workers/zygote.py: start_report)
        self.forks = 0
        self.spawned_without = 0  # workers started fresh while it was down
        self._numbers = itertools.count(1)
        supervisor.add_kind(self)
        supervisor.watch(self.child, self)

    @property
    def starting(self) -> bool:
        """Its first start is under way: workers wait for it rather than import TensorFlow each."""
        return self.state == STARTING and self._first_start

    def status(self) -> dict[str, Any]:
        return {"pid": self.child.pid if self.child.running else None, "state": self.state,
                "restarts": self.child.restarts, "forks": self.forks, "spawned_without": self.spawned_without,
                "report": self.report}

    def fork(self, worker: Child) -> bool:
        """Fork ``worker`` (``python -m workers`` flags, environment and fds from its Child); False
        when the zygote cannot, and the caller starts a fresh interpreter."""
        if self.state != READY or self._sock is None:
            self.spawned_without += 1
            return False
        number = next(self._numbers)
        names = list(worker.fd_env)
        request = {"fork": number, "argv": worker.argv[2:], "env": child_env(worker), "fd_env": names}
        try:
            forking.send(self._sock, request, [worker.fd_env[name] for name in names])
            reply = self._reply(number)
        except forking.ChannelError as exc:
            self._lost(f"no answer to a fork: {exc}")
            return False
        if "pid" not in reply:
            log.error("the zygote did not fork %s: %s", worker.name, reply.get("error"))
            self.spawned_without += 1
            return False
        worker.process = AdoptedProcess(int(reply["pid"]))
        started(worker, forked=True)
        self.forks += 1
        return True

    def manage(self, now: float) -> None:
        """Its hello, once its imports are done; a first start that takes too long is given up."""
        if self.state != STARTING or self._sock is None:
            return
        try:
            readable, _, _ = select.select([self._sock], [], [], 0)
            if readable:
                message, fds = forking.receive(self._sock)
                for fd in fds:
                    socket.close(fd)
                if isinstance(message.get("hello"), dict):
                    self.report = message["hello"]
                    self.state = READY
                    self._first_start = False
                    log.info("zygote ready (pid %s): TensorFlow imported in %.1f s", self.child.pid,
                             self.report.get("import_s", 0.0))
                    return
        except forking.ChannelError as exc:
            self._lost(f"its channel: {exc}")
            return
        if now - self.child.started_at > ZYGOTE_START_TIMEOUT_S:
            self._lost(f"not ready after {ZYGOTE_START_TIMEOUT_S:.0f} s")

    def stop(self) -> None:
        self._close()
        self.state = DOWN
        self._supervisor.stop([self.child], self._config.shutdown_grace_s)

    # --- the supervisor's kind ---

    def restarts(self, child: Child, code: int) -> bool:
        return code not in (EXIT_BOOT_ERROR, EXIT_CONFIG_ERROR)  # TensorFlow does not import: spawn from now on

    def exited(self, child: Child, code: int, now: float) -> None:
        self._close()
        self._first_start = False
        if self.state != DOWN or code != 0:
            log.error("the zygote (pid %s) exited with code %d: workers start as fresh interpreters until it is "
                      "back", child.pid, code)
        self.state = DOWN

    def start(self, child: Child, now: float) -> None:
        ours, theirs = forking.channel()
        child.env = {forking.ZYGOTE_FD_ENV: str(theirs.fileno())}
        child.pass_fds = (theirs.fileno(),)
        try:
            spawn_child(child)
        finally:
            theirs.close()
        self._sock = ours
        self.state = STARTING

    def speaking(self) -> Iterable[Speaker]:
        return ()  # it speaks on its channel only; its silence is a fork that is not answered

    def silent(self, link: Speaker, now: float) -> None:
        pass

    # --- implementation ---

    def _reply(self, number: int) -> dict[str, Any]:
        assert self._sock is not None
        deadline = time.monotonic() + FORK_TIMEOUT_S
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._sock], [], [], left)[0]:
                raise forking.ChannelError(f"no reply within {FORK_TIMEOUT_S:.0f} s")
            message, fds = forking.receive(self._sock)
            for fd in fds:
                socket.close(fd)
            if message.get("fork") == number:
                return message

    def _lost(self, why: str) -> None:
        """It cannot serve forks: terminated (the supervisor restarts it), workers spawn meanwhile."""
        self._close()
        self.state = DOWN
        self._first_start = False
        terminate_child(self.child, why)

    def _close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
