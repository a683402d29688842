"""The broker's model workers: one per model version and device (``--devices``).

``manage`` runs in the broker's housekeeping tick: reap exited children, kill silent or
stuck workers, restart what died (with back-off), send heartbeats. A worker that exits with
EXIT_MODEL_LOAD_ERROR is not restarted: its version goes to END with the error in status.
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
from broker.links import SendToChild, WorkerLink, reap_links, restarts_due, send_heartbeats, silent
from broker.models import ServedVersion
from broker.signatures import describe_for_clients
from broker.versions import VersionState
from broker.supervisor import (Child, curve_env, restartable, schedule_restart, spawn_child,
                               stop_children, terminate_child)
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


class Fleet:
    def __init__(self, config: ServerConfig, batching: BatchingParameters, send: SendToChild, report: Report) -> None:
        self.config = config
        self._batching = batching
        self._send_to = send
        self._report = report
        self.serving: list[ServedVersion] = []  # versions that have (or are getting) a worker
        self._links: dict[bytes, WorkerLink] = {}
        self.devices = resolve_devices(self.config.devices)  # ConfigError: a bad --devices
        self.output = OutputRelay(cpu_only=self.devices == [CPU_ONLY])  # what the workers write to fd 2
        self.stopping = False  # the broker is stopping: a worker that exits now is not started again

    def pids(self) -> list[int]:
        """The live worker processes, for the CPU and memory metrics."""
        return [link.child.pid for s in self.serving for link in s.links()
                if link.child.running and link.child.pid is not None]

    def stop_workers(self) -> None:
        """The workers, once their versions were told to unload: after the batches in hand."""
        stop_children([link.child for s in self.serving for link in s.links()], self.config.shutdown_grace_s)
        self._reap_workers(time.monotonic())
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
            link.child.restart_at = now
        elif link.load_failures and served.state is VersionState.LOADING:  # a load retried, as TF Serving's
            link.child.restart_at = now + self.config.load_retry_interval_micros / 1e6
        else:
            schedule_restart(link.child, now)

    def cancel_restart(self, served: ServedVersion, replica: int) -> None:
        link = served.link(replica)
        if link is not None:
            link.child.restart_at = 0.0
            self._links.pop(link.identity, None)

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
        if link is not None:
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
        log.info("worker for model %s version %d on %s is ready (pid %s)", served.model, served.version,
                 link.device, header.pid)
        self._report(served, lc.WorkerReady(link.replica), time.monotonic())

    def on_disconnect(self, link: WorkerLink, header: protocol.Disconnect) -> None:
        if header.error:
            link.error = header.error

    # --- the housekeeping tick ---

    def manage(self, now: float) -> None:
        self.output.poll()
        self._reap_workers(now)
        self._murder_workers(now)
        self._restart_due(now)
        send_heartbeats([link for s in self.serving for link in s.links() if s.replica_state(link) in SPOKEN],
                        now, self.config.heartbeat_interval_s, self._send_to)

    # --- implementation ---

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
                      env={**curve_env(self.config.curve_secret_key_file), "CUDA_VISIBLE_DEVICES": device.cuda_visible_devices,
                           TF_OUTPUT_FD_ENV: str(write_fd)}, pass_fds=(write_fd,))
        while len(served.workers) <= replica:
            served.workers.append(None)
        old = served.workers[replica]
        if old is not None:  # a restart keeps the back-off state
            child.restarts = old.child.restarts
            self._links.pop(old.identity, None)
        load_failures = old.load_failures if old is not None else 0
        try:
            spawn_child(child)
        finally:
            os.close(write_fd)
        self.output.watch(read_fd, config.title, child.pid or 0)
        identity = f"{served.model}:{served.version}:{child.pid}".encode()
        link = WorkerLink(child, identity, replica=replica, device=device.name, last_heard=time.monotonic(),
                          load_failures=load_failures)
        served.workers[replica] = link
        self._links[identity] = link

    def _reap_workers(self, now: float) -> None:
        owners = {id(link): served for served in self.serving for link in served.links()}
        for link, code in reap_links([link for served in self.serving for link in served.links()]):
            served, child = owners[id(link)], link.child
            if child.pid is not None:
                self.output.drain(child.pid)  # its last words (a failed CHECK) before its exit
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

    def _murder_workers(self, now: float) -> None:
        """A worker that stopped answering gets SIGUSR1 and SIGTERM (it writes its stacks: faulthandler),
        its requests go to another replica or get 503 at once, and SIGKILL follows after
        kill_grace_s."""
        expiry_s = self.config.heartbeat_expiry_s
        for served in list(self.serving):
            for link in served.links():
                if not link.child.running:
                    continue
                if link.child.terminated_at:
                    if now - link.child.terminated_at > self.config.kill_grace_s:
                        terminate_child(link.child, "still running after SIGTERM", kill=True)
                    continue
                state = served.replica_state(link)
                if state in SPOKEN and silent(link, now, expiry_s):
                    event = lc.WorkerSilent(f"no heartbeat for {now - link.last_heard:.1f} s", replica=link.replica)
                elif state is lc.Replica.STARTING and now - link.child.started_at > self.config.worker_load_timeout_s:
                    limit = f"{self.config.worker_load_timeout_s:.0f} s"
                    event = lc.WorkerSilent(f"not ready after {limit}", load_error=f"loading took longer than {limit}",
                                            replica=link.replica)
                else:
                    continue
                self._report(served, event, now)

    def _restart_due(self, now: float) -> None:
        if self.stopping:
            return
        for served in list(self.serving):
            for link in restarts_due(served.links(), now):
                self._spawn_worker(served, link.replica)
                self._report(served, lc.WorkerStarted(link.replica), now)

    def _version_of(self, link: WorkerLink) -> ServedVersion | None:
        for served in self.serving:
            if any(candidate is link for candidate in served.workers):
                return served
        return None
