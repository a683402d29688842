"""The broker's model workers: one per model version and device (``--devices``).

The workers are one kind of the supervisor's children (broker/supervisor.py): the fleet
tells it what an exit means (a WorkerExited for the version's lifecycle, which decides on a
restart: a worker that exits with EXIT_MODEL_LOAD_ERROR is not restarted, its version goes to
END with the error in status) and what silence means. Each worker is forked by the zygote
(broker/zygote.py) when it is up, else started as a fresh interpreter; while the zygote makes
its first start, workers wait for it (one import of TensorFlow, not one each). A fork that is
not READY within --worker_load_timeout_s is killed and its replica starts fresh from then on.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import Callable

from broker import lifecycle as lc
from tfbroker.wire import protocol
from tfbroker.runtime.devices import CPU_ONLY, resolve_devices
from broker.batch_codec import describe_tasks
from broker.child_output import OutputRelay
from broker.config import BatchingParameters, ServerConfig
from tfbroker.runtime.flags import dataclass_to_argv
from broker.links import SendToChild, WorkerLink
from broker.models import ServedVersion
from broker.signatures import describe_for_clients
from broker.versions import VersionState
from broker.supervisor import Child, Speaker, Supervisor, curve_env, restartable, spawn_child, terminate_child
from broker.zygote import Zygote
from tfbroker.runtime.logs import TF_OUTPUT_FD_ENV
from tfbroker.runtime.process import EXIT_MODEL_LOAD_ERROR
from tfbroker.runtime.settings import WorkerConfig

log = logging.getLogger("tfbroker.fleet")

# Replica states in which a worker has said READY: it gets heartbeats, and its silence counts.
SPOKEN = frozenset({lc.Replica.READY, lc.Replica.LEAVING})

# What the fleet reports to a version's lifecycle (the version manager's handle).
Report = Callable[[ServedVersion, lc.Event, float], None]


# The signals a process dies of when the code it runs fails (a CHECK that aborts, a bad memory
# access): a worker that dies of one while running batches may have been killed by a request.
# SIGKILL and SIGTERM come from outside (the OOM killer, an operator) and say nothing of it.
FAULT_SIGNALS = frozenset({signal.SIGABRT, signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL,
                           signal.SIGTRAP})


WAIT, FORK, SPAWN = "wait", "fork", "spawn"


def start_mode(link: WorkerLink, zygote: Zygote | None) -> str:
    """How a worker starts: forked from the zygote (FORK); as a fresh interpreter (SPAWN) without
    one, or when this replica's fork hung in its load (a fork may inherit a lock); or, while
    the zygote makes its first start, after it (WAIT). A fork the zygote cannot make spawns."""
    if zygote is None or link.spawn_only:
        return SPAWN
    return WAIT if zygote.starting else FORK


class Fleet:
    kind = "worker"

    def __init__(self, config: ServerConfig, batching: BatchingParameters, send: SendToChild, report: Report,
                 supervisor: Supervisor, zygote: Zygote | None = None) -> None:
        self.config = config
        self._batching = batching
        self._send_to = send
        self._report = report
        self._supervisor = supervisor
        self._zygote = zygote
        self.serving: list[ServedVersion] = []  # versions that have (or are getting) a worker
        self._links: dict[bytes, WorkerLink] = {}
        self._owners: dict[int, tuple[ServedVersion, WorkerLink]] = {}  # id(child) -> its version and link
        self._waiting: list[WorkerLink] = []  # to be forked once the zygote has made its first start
        self._never_started: list[WorkerLink] = []  # told to go while waiting: their exits are reported
        self._output_fds: dict[int, int] = {}  # id(child) -> the read end of its fd 2 pipe
        self.devices = resolve_devices(self.config.devices)  # ConfigError: a bad --devices
        self.output = OutputRelay(cpu_only=self.devices == [CPU_ONLY])  # what the workers write to fd 2
        supervisor.add_kind(self)

    def pids(self) -> list[int]:
        """The live worker processes, for the CPU and memory metrics."""
        return [link.child.pid for s in self.serving for link in s.links()
                if link.child.running and link.child.pid is not None]

    def stop_workers(self) -> None:
        """The workers, once their versions were told to unload: after the batches in hand."""
        self._supervisor.stop([link.child for s in self.serving for link in s.links()], self.config.shutdown_grace_s)
        self._supervisor.reap(time.monotonic())
        self.output.close()

    def link(self, identity: bytes) -> WorkerLink | None:
        return self._links.get(identity)

    # --- what a version's lifecycle asks for (broker/manager.py carries it out) ---

    @property
    def replicas(self) -> int:
        """Workers per model version: one per device."""
        return len(self.devices)

    def spawn_worker(self, served: ServedVersion, replica: int) -> None:
        if served not in self.serving:
            self.serving.append(served)
        self._spawn_worker(served, replica)

    def restart_worker(self, served: ServedVersion, replica: int, now: float, *, at_once: bool = False) -> None:
        link = served.link(replica)
        if link is None:
            return
        if at_once:
            self._supervisor.schedule_restart(link.child, now, delay_s=0.0)
        elif link.load_failures and served.state is VersionState.LOADING:  # a load retried, as TF Serving's
            self._supervisor.schedule_restart(link.child, now, delay_s=self.config.load_retry_interval_micros / 1e6)
        else:
            self._supervisor.schedule_restart(link.child, now)

    def cancel_restart(self, served: ServedVersion, replica: int) -> None:
        link = served.link(replica)
        if link is not None:
            link.child.restart_at = 0.0
            self._links.pop(link.identity, None)
            if link in self._waiting:
                self._waiting.remove(link)
                self._close_output(link.child)
            if not link.child.running:  # else watched until it exits
                self._forget_child(link.child)

    def forget_version(self, served: ServedVersion) -> None:
        """The version has ended: no restart, no link."""
        for replica in range(len(served.workers)):
            self.cancel_restart(served, replica)
        if served in self.serving:
            self.serving.remove(served)

    def disconnect_worker(self, served: ServedVersion, replica: int, now: float) -> None:
        link = served.link(replica)
        if link is not None:
            self._send_to(link.identity, protocol.DISCONNECT, protocol.Disconnect(), ())
            link.disconnect_sent = now

    def terminate_worker(self, served: ServedVersion, replica: int, reason: str, *, dump: bool = True) -> None:
        link = served.link(replica)
        if link is None:
            return
        if link in self._waiting:  # never started: it has gone as far as its version knows (next tick)
            self._waiting.remove(link)
            self._close_output(link.child)
            self._never_started.append(link)
            return
        terminate_child(link.child, reason, dump=dump)

    # --- messages from workers ---

    def on_ready(self, link: WorkerLink, header: protocol.Ready) -> None:
        served = self._version_of(link)
        if served is None:
            return
        if (header.model, header.version) != (served.model, served.version):
            log.error("worker %r said READY for %s:%d; ignored", link.identity, header.model, header.version)
            return
        served.model_signatures = header.signatures
        served.model_signature_def = header.signature_def
        describe_for_clients(served)  # what clients send: lookup inputs in place of their outputs
        log.info("worker for model %s version %d on %s is ready (pid %s, %s, %.2f s after its start)", served.model,
                 served.version, link.device, header.pid, "forked" if link.child.forked else "spawned",
                 time.monotonic() - link.child.started_at)
        self._report(served, lc.WorkerReady(link.replica), time.monotonic())

    def on_disconnect(self, link: WorkerLink, header: protocol.Disconnect) -> None:
        if header.error:
            link.error = header.error

    # --- the housekeeping tick (the supervisor's kind: broker/supervisor.py) ---

    def manage(self, now: float) -> None:
        self.output.poll()
        while self._never_started:
            link = self._never_started.pop()
            owner = self._owners.get(id(link.child))
            if owner is not None:
                self._forget_child(link.child)
                self._report(owner[0], lc.WorkerExited(-signal.SIGTERM, False, replica=link.replica), now)
        if self._waiting and (self._zygote is None or not self._zygote.starting):
            waiting, self._waiting = self._waiting, []
            for link in waiting:
                self._launch(link)
        self._load_timeouts(now)

    def restarts(self, child: Child, code: int) -> bool:
        return False  # the version's lifecycle decides (WorkerExited), and calls restart_worker

    def exited(self, child: Child, code: int, now: float) -> None:
        owner = self._owners.get(id(child))
        if owner is None:
            self._supervisor.forget(child)
            return
        served, link = owner
        if child.pid is not None:
            self.output.drain(child.pid)  # its last words (a failed CHECK) before its exit
        if served not in self.serving:  # its version has ended: nothing to tell
            self._forget_child(child)
            return
        if link.in_flight and code != 0:
            log.error("worker %s (pid %s) exited with code %d holding these requests: %s", child.name,
                      child.pid, code, describe_tasks(link.tasks()))
        elif served.state is not VersionState.UNLOADING:
            log.error("worker %s (pid %s) exited with code %d", child.name, child.pid, code)
        again = restartable(code)
        if (code == EXIT_MODEL_LOAD_ERROR and served.state is VersionState.LOADING
                and link.load_failures < self.config.max_num_load_retries):
            link.load_failures += 1
            again = True
            log.warning("model %s version %d failed to load (%s); retry %d of %d in %.0f s", served.model,
                        served.version, link.error or f"exit code {code}", link.load_failures,
                        self.config.max_num_load_retries, self.config.load_retry_interval_micros / 1e6)
        on_requests = bool(link.in_flight) and -code in FAULT_SIGNALS
        self._report(served, lc.WorkerExited(code, again, link.error, replica=link.replica,
                                             on_requests=on_requests), now)

    def start(self, child: Child, now: float) -> None:
        owner = self._owners.get(id(child))
        if owner is None:
            return
        served, link = owner
        self._spawn_worker(served, link.replica)
        self._report(served, lc.WorkerStarted(link.replica), now)

    def speaking(self) -> list[Speaker]:
        return [link for s in self.serving for link in s.links() if s.replica_state(link) in SPOKEN]

    def silent(self, link: Speaker, now: float) -> None:
        """A worker that stopped answering gets SIGUSR1 and SIGTERM (it writes its stacks: faulthandler),
        its requests go to another replica or get 503 at once, and SIGKILL follows after
        kill_grace_s (the supervisor)."""
        owner = self._owners.get(id(link.child))
        if owner is not None:
            served, worker = owner
            self._report(served, lc.WorkerSilent(f"no heartbeat for {now - link.last_heard:.1f} s",
                                                 replica=worker.replica), now)

    # --- implementation ---

    def _load_timeouts(self, now: float) -> None:
        """A worker not READY within --worker_load_timeout_s fails its version's load; a forked
        one is killed and started again as a fresh interpreter first (a fork may have inherited
        a lock another thread held), and its replica spawns from then on."""
        limit_s = self.config.worker_load_timeout_s
        for served in list(self.serving):
            for link in served.links():
                child = link.child
                if (not child.running or child.terminated_at or served.replica_state(link) is not lc.Replica.STARTING
                        or now - child.started_at <= limit_s):
                    continue
                if child.forked:
                    link.spawn_only = True
                    terminate_child(child, f"forked by the zygote and not ready after {limit_s:.0f} s: it starts "
                                           "again as a fresh interpreter")  # its exit restarts it (WorkerExited)
                    continue
                self._report(served, lc.WorkerSilent(f"not ready after {limit_s:.0f} s",
                                                     load_error=f"loading took longer than {limit_s:.0f} s",
                                                     replica=link.replica), now)

    def _spawn_worker(self, served: ServedVersion, replica: int) -> None:
        params = served.batching or self._batching
        warmup = params.allowed_batch_sizes or tuple(sorted({1, params.max_batch_size}))
        device = self.devices[replica]
        config = WorkerConfig(
            model_name=served.model, version=served.version, path=served.path,
            backend_address=self.config.resolved_backend_address,
            heartbeat_interval_s=self.config.heartbeat_interval_s,
            heartbeat_liveness=self.config.heartbeat_liveness,
            warmup_batch_sizes=warmup, log_level=self.config.log_level,
            device="" if self.devices == [CPU_ONLY] else device.name, tensorflow=self.config.tensorflow)
        read_fd, write_fd = self.output.pipe()
        child = Child(name=config.title, argv=["-m", "workers", *dataclass_to_argv(config)],
                      env={**curve_env(self.config.curve_secret_key_file), "CUDA_VISIBLE_DEVICES": device.cuda_visible_devices},
                      fd_env={TF_OUTPUT_FD_ENV: write_fd})
        while len(served.workers) <= replica:
            served.workers.append(None)
        old = served.workers[replica]
        link = WorkerLink(child, replica=replica, device=device.name)
        if old is not None:  # a restart keeps the back-off state, the load retries and the start mode
            child.restarts = old.child.restarts
            link.load_failures = old.load_failures
            link.spawn_only = old.spawn_only
            self._links.pop(old.identity, None)
            self._owners.pop(id(old.child), None)
            if not old.child.running:  # else reaped when it exits, and told to no version
                self._supervisor.forget(old.child)
        served.workers[replica] = link
        self._owners[id(child)] = (served, link)
        self._output_fds[id(child)] = read_fd
        self._supervisor.watch(child, self)
        self._launch(link)

    def _launch(self, link: WorkerLink) -> None:
        child = link.child
        mode = start_mode(link, self._zygote)
        if mode == WAIT:
            child.started_at = time.monotonic()
            self._waiting.append(link)
            return
        if mode == SPAWN or self._zygote is None or not self._zygote.fork(child):
            spawn_child(child)
        for fd in child.fd_env.values():
            os.close(fd)  # the child's now
        read_fd = self._output_fds.pop(id(child))
        self.output.watch(read_fd, child.name, child.pid or 0)
        owner = self._owners[id(child)][0]
        link.identity = f"{owner.model}:{owner.version}:{child.pid}".encode()
        link.last_heard = time.monotonic()
        self._links[link.identity] = link

    def _close_output(self, child: Child) -> None:
        read_fd = self._output_fds.pop(id(child), None)
        if read_fd is not None:
            os.close(read_fd)
            for fd in child.fd_env.values():
                os.close(fd)

    def _forget_child(self, child: Child) -> None:
        self._owners.pop(id(child), None)
        self._supervisor.forget(child)

    def _version_of(self, link: WorkerLink) -> ServedVersion | None:
        owner = self._owners.get(id(link.child))
        return owner[0] if owner is not None and owner[1] is link else None
