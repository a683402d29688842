"""The broker's children: one worker per model version, and the HTTP frontends (under gunicorn).

``manage`` runs in the broker's housekeeping tick: reap exited children, kill silent or
stuck workers, restart what died (with back-off), send heartbeats. A worker that exits with
EXIT_MODEL_LOAD_ERROR is not restarted: its version goes to END with the error in status.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
import signal
import socket
import struct
import sys
import time
from typing import Callable

from broker import lifecycle as lc
from tfbroker.wire import protocol
from tfbroker.runtime.settings import ADDRESS_ENV, BIND_ENV, FRONTENDS_ENV, LIMITS_ENV, LOG_LEVEL_ENV, METRICS_DIR_ENV, METRICS_PATH_ENV, TIMEOUT_ENV
from tfbroker.runtime.devices import CPU_ONLY, resolve_devices
from broker.batch_codec import describe_tasks
from broker.config import BatchingParameters, ServerConfig
from broker.dispatch import SendToChild
from tfbroker.runtime.flags import dataclass_to_argv
from broker.stats import children_of
from broker.models import ServedVersion, WorkerLink
from broker.signatures import describe_for_clients
from broker.versions import VersionState
from broker.supervisor import (Child, curve_env, reap_children, restartable, schedule_restart, spawn_child,
                               stop_children, terminate_child)
from tfbroker.runtime.settings import WorkerConfig

log = logging.getLogger("tfbroker.fleet")

SO_ATTACH_FILTER = 26  # Linux, <asm-generic/socket.h>
# After new connections are refused, how long the frontends get to accept the queued ones.
ACCEPT_DRAIN_S = 0.3

# What the fleet reports to a version's lifecycle (the version manager's handle).
Report = Callable[[ServedVersion, lc.Event, float], None]


class Fleet:
    def __init__(self, config: ServerConfig, batching: BatchingParameters, send: SendToChild, report: Report, *,
                 metrics_path: str = "") -> None:
        self.config = config
        self._batching = batching
        self._send_to = send
        self._report = report
        self._metrics_path = metrics_path  # the Prometheus path the frontends serve ("" none)
        self.serving: list[ServedVersion] = []  # versions that have (or are getting) a worker
        self._links: dict[bytes, WorkerLink] = {}
        self.devices = resolve_devices(self.config.devices)  # ConfigError: a bad --devices
        self._frontends: list[Child] = []
        self._listener: socket.socket | None = None
        self._announced = False
        self._stopping = False

    # --- start and stop ---

    def start(self) -> None:
        """Start the frontends; workers start as the version manager loads versions."""
        if self.config.frontends:
            self._listener = bind_http(self.config.rest_api_host, self.config.rest_api_port)
            # One gunicorn master forks the frontends from a preloaded app (they share its
            # modules' memory) and restarts any that dies; the broker supervises the master.
            child = Child(
                name="frontends",
                argv=["-m", "gunicorn", "-c", "python:frontend.gunicorn_conf", "frontend.app:app"],
                env={ADDRESS_ENV: self.config.resolved_frontend_address,
                     TIMEOUT_ENV: str(self.config.rest_api_timeout_in_ms),
                     FRONTENDS_ENV: str(self.config.frontends),
                     BIND_ENV: f"fd://{self._listener.fileno()}",
                     LOG_LEVEL_ENV: self.config.log_level,
                     LIMITS_ENV: " ".join(dataclass_to_argv(self.config.limits)),
                     **self._metrics_env(), **curve_env(self.config.curve_secret_key_file)},
                pass_fds=(self._listener.fileno(),))
            self._frontends.append(child)
            spawn_child(child)
            log.info("%d frontends on http://%s:%d", self.config.frontends, self.config.rest_api_host,
                     self.http_port)

    @property
    def http_port(self) -> int:
        return self._listener.getsockname()[1] if self._listener else self.config.rest_api_port

    def refuse_connections(self) -> None:
        """The first step of a graceful stop: new connections are no longer taken (their SYNs
        are dropped, so clients retry and then find the port closed), while the frontends still
        accept the ones the kernel has queued. Closing the listener at once would reset those."""
        if self._listener is not None:
            drop_new_connections(self._listener)

    def stop_frontends(self) -> None:
        """SIGTERM the frontends without waiting: they finish their open requests while the
        broker keeps serving them, and are not restarted."""
        self._stopping = True
        for child in self._frontends:
            child.restart_at = 0.0
            if child.running and child.process is not None:
                child.process.send_signal(signal.SIGTERM)
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def roll_frontends(self) -> None:
        """gunicorn's HUP: new frontends are forked, the old ones finish their requests."""
        for child in self._frontends:
            if child.running and child.process is not None:
                child.process.send_signal(signal.SIGHUP)

    def pids_by_role(self) -> dict[str, list[int]]:
        """The live processes of each role, for the CPU and memory metrics."""
        workers = [link.child.pid for s in self.serving for link in s.links() if link.child.running]
        masters = [c.pid for c in self._frontends if c.running and c.pid is not None]
        return {"broker": [os.getpid()], "worker": [pid for pid in workers if pid is not None],
                "frontend": [pid for master in masters for pid in [master, *children_of(master)]]}

    def frontends_running(self) -> bool:
        return any(child.process is not None and child.process.poll() is None for child in self._frontends)

    def stop_frontends_now(self) -> None:
        """Whatever frontend is left, within a second."""
        self.stop_frontends()
        stop_children(self._frontends, grace_s=1.0)

    def stop_workers(self) -> None:
        """The workers, once their versions were told to unload: after the batches in hand."""
        stop_children([link.child for s in self.serving for link in s.links()], self.config.shutdown_grace_s)
        self._reap_workers(time.monotonic())

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

    def restart_worker(self, served: ServedVersion, replica: int, now: float) -> None:
        link = served.link(replica)
        if link is not None:
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

    def terminate_worker(self, served: ServedVersion, replica: int, reason: str) -> None:
        link = served.link(replica)
        if link is not None:
            link.ready = False
            terminate_child(link.child, reason)

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
        link.ready = True
        log.info("worker for model %s version %d on %s is ready (pid %s)", served.model, served.version,
                 link.device, header.pid)
        self._report(served, lc.WorkerReady(link.replica), time.monotonic())

    def on_disconnect(self, link: WorkerLink, header: protocol.Disconnect) -> None:
        if header.error:
            link.error = header.error

    # --- the housekeeping tick ---

    def manage(self, now: float) -> None:
        self._reap_workers(now)
        self._murder_workers(now)
        self._restart_due(now)
        for served in self.serving:
            for link in served.links():
                if link.ready and now - link.last_sent >= self.config.heartbeat_interval_s:
                    self._send_to(link.identity, protocol.HEARTBEAT, protocol.Heartbeat(), ())
                    link.last_sent = now
        for child, code in reap_children(self._frontends):
            if not self._stopping:
                log.error("%s (pid %s) exited with code %d; restarting", child.name, child.pid, code)
                schedule_restart(child, now)

    def announce(self) -> None:
        """Tell the person who started the broker how to call it, once everything is up."""
        if self._announced or any(s.state is not VersionState.AVAILABLE for s in self.serving):
            return
        self._announced = True
        if not self.config.frontends:
            print(f"tfbroker: serving {len(self.serving)} model(s); clients connect to "
                  f"{self.config.resolved_frontend_address}", flush=True)
            return
        host = "localhost" if self.config.rest_api_host in ("0.0.0.0", "::") else self.config.rest_api_host
        lines = ["tfbroker: ready. Try:"]
        for served in self.serving:
            base = f"http://{host}:{self.http_port}/v1/models/{served.model}"
            lines.append(f"  curl {base}")
            example = _example_body(served)
            if example:
                lines.append(f"  curl -d '{example}' {base}:predict")
        print("\n".join(lines), file=sys.stdout, flush=True)

    # --- implementation ---

    def _spawn_worker(self, served: ServedVersion, replica: int) -> None:
        params = self._batching
        warmup = params.allowed_batch_sizes or tuple(sorted({1, params.max_batch_size}))
        device = self.devices[replica]
        config = WorkerConfig(
            model_name=served.model, version=served.version, path=served.path,
            backend_address=self.config.resolved_backend_address,
            heartbeat_interval_s=self.config.heartbeat_interval_s,
            heartbeat_liveness=self.config.heartbeat_liveness,
            warmup_batch_sizes=warmup, log_level=self.config.log_level,
            device="" if self.devices == [CPU_ONLY] else device.name,
            tensorflow_intra_op_parallelism=self.config.tensorflow_intra_op_parallelism,
            tensorflow_inter_op_parallelism=self.config.tensorflow_inter_op_parallelism)
        child = Child(name=config.title, argv=["-m", "workers", *dataclass_to_argv(config)],
                      env={**curve_env(self.config.curve_secret_key_file), "CUDA_VISIBLE_DEVICES": device.cuda_visible_devices})
        while len(served.workers) <= replica:
            served.workers.append(None)
        old = served.workers[replica]
        if old is not None:  # a restart keeps the back-off state
            child.restarts = old.child.restarts
            self._links.pop(old.identity, None)
        spawn_child(child)
        identity = f"{served.model}:{served.version}:{child.pid}".encode()
        link = WorkerLink(child, identity, replica=replica, device=device.name, last_heard=time.monotonic())
        served.workers[replica] = link
        self._links[identity] = link

    def _reap_workers(self, now: float) -> None:
        owners = {link.child.pid: (served, link) for served in self.serving for link in served.links()}
        for child, code in reap_children([link.child for _served, link in owners.values()]):
            served, link = owners[child.pid]
            link.ready = False
            if link.in_flight and code != 0:
                log.error("worker %s (pid %s) exited with code %d holding these requests: %s", child.name,
                          child.pid, code, describe_tasks(link.tasks()))
            elif served.state is not VersionState.UNLOADING:
                log.error("worker %s (pid %s) exited with code %d", child.name, child.pid, code)
            event = lc.WorkerExited(code, restartable(code), link.error, replica=link.replica)
            self._report(served, event, now)

    def _murder_workers(self, now: float) -> None:
        """A worker that stopped answering gets SIGTERM (it writes its traceback: faulthandler),
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
                if link.ready and now - link.last_heard > expiry_s:
                    event = lc.WorkerSilent(f"no heartbeat for {now - link.last_heard:.1f} s", replica=link.replica)
                elif not link.ready and now - link.child.started_at > self.config.worker_load_timeout_s:
                    limit = f"{self.config.worker_load_timeout_s:.0f} s"
                    event = lc.WorkerSilent(f"not ready after {limit}", load_error=f"loading took longer than {limit}",
                                            replica=link.replica)
                else:
                    continue
                self._report(served, event, now)

    def _restart_due(self, now: float) -> None:
        for served in list(self.serving):
            for link in served.links():
                if link.child.restart_at and now >= link.child.restart_at:
                    self._spawn_worker(served, link.replica)
                    self._report(served, lc.WorkerStarted(link.replica), now)
        for child in self._frontends:
            if child.restart_at and now >= child.restart_at:
                spawn_child(child)

    def _metrics_env(self) -> dict[str, str]:
        """The Prometheus path, and a fresh directory where the frontends share their counters."""
        if not self._metrics_path:
            return {}
        directory = os.path.join(self.config.resolved_runtime_dir, "metrics")
        shutil.rmtree(directory, ignore_errors=True)
        os.makedirs(directory, mode=0o700)
        return {METRICS_PATH_ENV: self._metrics_path, METRICS_DIR_ENV: directory}

    def _version_of(self, link: WorkerLink) -> ServedVersion | None:
        for served in self.serving:
            if any(candidate is link for candidate in served.workers):
                return served
        return None



def bind_http(host: str, port: int) -> socket.socket:
    """The listening socket the frontends share, as gunicorn's arbiter does."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    os.set_inheritable(sock.fileno(), True)
    return sock


def drop_new_connections(sock: socket.socket) -> None:
    """Attach a classic BPF filter that drops every packet reaching the listening socket: no
    new SYN is answered, connections already established stay in its accept queue."""
    drop_all = struct.pack("HBBI", 0x06, 0, 0, 0)  # BPF_RET | BPF_K, return 0: keep no bytes
    program = ctypes.create_string_buffer(drop_all)
    fprog = struct.pack("HL", 1, ctypes.addressof(program))  # struct sock_fprog {len, filter*}
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
    except OSError as exc:  # not Linux, or not allowed: the listener is simply closed later
        log.warning("cannot stop new connections before closing the listener: %s", exc)


def _example_body(served: ServedVersion) -> str:
    """A request body for the ready message: TF Serving's row format, one instance (three
    for a lone rank-1 input), for inputs of rank 1 or 2 with known inner sizes."""
    signature = served.signatures.get("serving_default")
    if not signature or not signature.inputs:
        return ""
    values = {}
    for name, (dtype, shape) in signature.inputs.items():
        if shape is None or not 1 <= len(shape) <= 2 or (len(shape) == 2 and shape[1] < 1 and dtype != "string"):
            return ""
        value: object = "example" if dtype == "string" else 0.5
        if len(shape) == 2:
            value = [value] * (3 if shape[1] < 1 else shape[1])
        values[name] = value
    if len(values) == 1 and not isinstance(next(iter(values.values())), list):
        return '{"instances": [1.0, 2.0, 5.0]}' if dtype != "string" else '{"instances": ["example"]}'
    instance = json.dumps(values if len(values) > 1 else next(iter(values.values())))
    return f'{{"instances": [{instance}]}}'
