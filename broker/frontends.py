"""The broker's HTTP frontends: one gunicorn master (``python -m gunicorn``, frontend.app)
that forks ``--frontends`` workers from a preloaded app on the listening socket the broker
binds and passes down, as gunicorn's arbiter does. The broker supervises the master (it
restarts a frontend that dies itself); a graceful stop refuses new connections, lets the
frontends finish their open requests, then stops them. Also the ready message.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import shlex
import shutil
import signal
import socket
import struct
import sys
from typing import Mapping, Sequence

from broker.config import ServerConfig
from broker.models import ServedModel, ServedVersion, no_versions_reason
from broker.stats import children_of
from broker.supervisor import Child, Speaker, Supervisor, curve_env, spawn_child, stop_children
from broker.versions import VersionState
from tfbroker.runtime.flags import dataclass_to_argv
from tfbroker.runtime.settings import (BIND_ENV, FRONTEND_ENV, FRONTENDS_ENV, LEGACY_FRONTEND_ENV, LOG_LEVEL_ENV,
                                       METRICS_DIR_ENV, FrontendConfig)

log = logging.getLogger("tfbroker.frontends")

SO_ATTACH_FILTER = 26  # Linux, <asm-generic/socket.h>
# After new connections are refused, how long the frontends get to accept the queued ones.
ACCEPT_DRAIN_S = 0.3


class Frontends:
    kind = "frontends"

    def __init__(self, config: ServerConfig, supervisor: Supervisor, *, metrics_path: str = "") -> None:
        self.config = config
        self._supervisor = supervisor
        supervisor.add_kind(self)
        self._metrics_path = metrics_path  # the Prometheus path the frontends serve ("" none)
        self._children: list[Child] = []
        self._listener: socket.socket | None = None
        self._started = False
        self._announced = False
        self._stopping = False

    def bind(self) -> None:
        """At start-up: take the HTTP port (bound, not listening: a client that connects
        now is refused, as by a closed port) and check the gRPC port is free, so a port in
        use stops the start at once."""
        if not self.config.frontends:
            return
        self._listener = bind_http(self.config.rest_api_host, self.config.rest_api_port)
        if self.config.grpc.port:
            check_port_free(self.config.grpc.port)

    def open_when_ready(self, models: Mapping[str, ServedModel], serving: Sequence[ServedVersion]) -> None:
        """As TF Serving: the ports open once every version loading at start-up has settled
        (AVAILABLE, or failed), so a readiness probe or a client that connects at once never
        meets a half-loaded server; loads after that change nothing. The ready message comes
        once the ports take connections, so a script that waits for it can call at once."""
        if self._announced:
            return
        if not self._started:
            if any(s.state is not VersionState.AVAILABLE for s in serving):
                return
            self._started = True
            self._start()
        if self._ports_accept():
            self._announced = True
            self._announce(models)

    def _ports_accept(self) -> bool:
        """The REST port listens (gunicorn has called listen(): a connection waits in its
        backlog for the first frontend), and the gRPC port, which each frontend binds itself,
        takes a connection."""
        if self._listener is None:
            return True
        if not self._listener.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            return False
        if not self.config.grpc.port:
            return True
        try:
            with socket.create_connection(("127.0.0.1", self.config.grpc.port), timeout=0.05):
                return True
        except OSError:
            return False

    def _start(self) -> None:
        if self._listener is None:
            return
        # One gunicorn master forks the frontends from a preloaded app (they share its
        # modules' memory) and restarts any that dies; the broker supervises the master.
        child = Child(
            name="frontends",
            argv=["-m", "gunicorn", "-c", "python:frontend.gunicorn_conf", "frontend.app:app"],
            env={FRONTEND_ENV: shlex.join(dataclass_to_argv(self.frontend_config())),
                 FRONTENDS_ENV: str(self.config.frontends),
                 BIND_ENV: f"fd://{self._listener.fileno()}",
                 LOG_LEVEL_ENV: self.config.log_level,
                 **{name: "" for name in LEGACY_FRONTEND_ENV},  # the broker's own environment must not override
                 **self._metrics_env(), **curve_env(self.config.curve_secret_key_file)},
            pass_fds=(self._listener.fileno(),))
        self._children.append(child)
        self._supervisor.watch(child, self)
        spawn_child(child)
        log.info("%d frontends on http://%s:%d%s", self.config.frontends, self.config.rest_api_host, self.http_port,
                 f", gRPC on port {self.config.grpc.port}" if self.config.grpc.port else "")

    @property
    def http_port(self) -> int:
        return self._listener.getsockname()[1] if self._listener else self.config.rest_api_port

    def refuse_connections(self) -> None:
        """The first step of a graceful stop: new connections are no longer taken (their SYNs
        are dropped, so clients retry and then find the port closed), while the frontends still
        accept the ones the kernel has queued. Closing the listener at once would reset those."""
        if self._listener is not None:
            drop_new_connections(self._listener)

    def stop(self) -> None:
        """SIGTERM the frontends without waiting: they finish their open requests while the
        broker keeps serving them, and are not restarted."""
        self._stopping = True
        for child in self._children:
            child.restart_at = 0.0
            if child.running and child.process is not None:
                child.process.send_signal(signal.SIGTERM)
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def stop_now(self) -> None:
        """Whatever frontend is left, within a second."""
        self.stop()
        stop_children(self._children, grace_s=1.0)

    def roll(self) -> None:
        """gunicorn's HUP: new frontends are forked, the old ones finish their requests."""
        for child in self._children:
            if child.running and child.process is not None:
                child.process.send_signal(signal.SIGHUP)

    def running(self) -> bool:
        return any(child.process is not None and child.process.poll() is None for child in self._children)

    def pids(self) -> list[int]:
        """The gunicorn master and its frontends, for the CPU and memory metrics."""
        masters = [c.pid for c in self._children if c.running and c.pid is not None]
        return [pid for master in masters for pid in [master, *children_of(master)]]

    # --- the supervisor's kind ---

    def restarts(self, child: Child, code: int) -> bool:
        return not self._stopping  # gunicorn's master: whatever it died of, HTTP must come back

    def exited(self, child: Child, code: int, now: float) -> None:
        pass  # its frontends' requests are the clients' to retry; nothing in the broker waits on them

    def start(self, child: Child, now: float) -> None:
        spawn_child(child)

    def speaking(self) -> list[Speaker]:
        return []  # gunicorn's master watches its frontends' heartbeats (its worker timeout)

    def silent(self, link: Speaker, now: float) -> None:
        pass

    def _announce(self, models: Mapping[str, ServedModel]) -> None:
        """Tell the person who started the broker how to call it: per model one command that
        answers 200, for its latest version (a long example body is written to a file beside
        the broker's sockets); for a model that serves nothing, why."""
        latest = {name: _latest_available(model) for name, model in sorted(models.items())}
        serving = [served for served in latest.values() if served is not None]
        idle = [f"  model {name} is not serving: {_not_serving_reason(models[name])}"
                for name, served in latest.items() if served is None]
        if not self.config.frontends:
            print("\n".join([f"tfbroker: serving {len(serving)} model(s); clients connect to "
                             f"{self.config.resolved_frontend_address}", *idle]), flush=True)
            return
        host = "localhost" if self.config.rest_api_host in ("0.0.0.0", "::") else self.config.rest_api_host
        root = f"http://{host}:{self.http_port}"
        grpc = f", gRPC on port {self.config.grpc.port}" if self.config.grpc.port else ""
        lines = [f"tfbroker: ready: REST on {root}{grpc}." + (" Try:" if serving else " No model is serving:")]
        examples = os.path.join(self.config.resolved_runtime_dir, "examples")
        for served in serving:
            url = f"{root}/v1/models/{served.model}"
            body = example_body(served)
            if not body:
                lines.append(f"  curl {url}")
            elif len(body) <= INLINE_BODY_CHARS:
                lines.append(f"  curl -d '{body}' {url}:predict")
            else:
                os.makedirs(examples, mode=0o700, exist_ok=True)
                path = os.path.join(examples, f"{served.model}.json")
                with open(path, "w", encoding="utf-8") as fh:
                    fh.write(body + "\n")
                lines.append(f"  curl -d @{path} {url}:predict")
        lines.extend(idle)
        if self.config.enable_status_page:
            lines.append(f"Status page: {root}/status")
        print("\n".join(lines), file=sys.stdout, flush=True)

    # --- implementation ---

    def frontend_config(self) -> FrontendConfig:
        config = self.config
        return FrontendConfig(frontend_address=config.resolved_frontend_address,
                              rest_api_timeout_in_ms=config.rest_api_timeout_in_ms, limits=config.limits,
                              grpc=config.grpc, metrics_path=self._metrics_path,
                              enable_status_page=config.enable_status_page,
                              request_log_max_file_bytes=config.request_log_max_file_bytes)

    def _metrics_env(self) -> dict[str, str]:
        """A fresh directory where the frontends share their counters (the metrics and status
        pages show every frontend's)."""
        if not self._metrics_path and not self.config.enable_status_page:
            return {}
        directory = os.path.join(self.config.resolved_runtime_dir, "metrics")
        shutil.rmtree(directory, ignore_errors=True)
        os.makedirs(directory, mode=0o700)
        return {METRICS_DIR_ENV: directory}


def bind_http(host: str, port: int) -> socket.socket:
    """The socket the frontends share, as gunicorn's arbiter does; gunicorn listens on it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"the REST port {port} on {host} cannot be bound ({exc.strerror}): pass another "
                      "--rest_api_port, or stop what holds it") from exc
    sock.set_inheritable(True)
    os.set_inheritable(sock.fileno(), True)
    return sock


def check_port_free(port: int) -> None:
    """The gRPC port, tried without SO_REUSEPORT: the frontends share it with each other
    (they bind it with SO_REUSEPORT), so a port another server holds, a second broker's
    frontends included, must be refused here, at start-up, as TF Serving would."""
    family, host = (socket.AF_INET6, "::") if socket.has_ipv6 else (socket.AF_INET, "0.0.0.0")
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise OSError(f"the gRPC port {port} is in use ({exc.strerror}): pass another --port, or --port=0 "
                          "for no gRPC") from exc


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


INLINE_BODY_CHARS = 120  # a longer example body goes to a file: the ready message stays short


def _latest_available(model: ServedModel) -> ServedVersion | None:
    available = [v for v in model.versions.values() if v.state is VersionState.AVAILABLE]
    return max(available, key=lambda v: v.version) if available else None


def _not_serving_reason(model: ServedModel) -> str:
    if not model.versions:
        return no_versions_reason(model.config.base_path)
    newest = max(model.versions.values(), key=lambda v: v.version)
    if newest.error:
        return f"version {newest.version} failed to load: {newest.error}"
    return f"version {newest.version} is {newest.state.value}"


def example_body(served: ServedVersion) -> str:
    """A request body that the version answers with 200: TF Serving's row format, one
    instance (three for a lone float input of rank 1), each value of its input's dtype (ints
    for ints, strings for strings) and every fixed dimension filled (an unknown inner one
    with 3 values); a looked-up input gets words or keys from its own tables
    (broker/lookups.py). Empty when an input's rank is unknown."""
    signature = served.signatures.get("serving_default")
    if not signature or not signature.inputs:
        return ""
    known = _table_entries(served.path)
    instance = {}
    for name, (dtype, shape) in signature.inputs.items():
        if not shape:  # unknown rank, or a scalar: no row format to show
            return ""
        words = known.get(name) or ["example"]
        instance[name] = _example_value(dtype, shape[1:], words)
    if len(instance) == 1:
        (dtype, shape), value = next(iter(signature.inputs.values())), next(iter(instance.values()))
        if shape is not None and len(shape) == 1 and dtype.startswith("float"):
            return '{"instances": [1.0, 2.0, 5.0]}'
        return f'{{"instances": [{json.dumps(value, separators=(",", ":"))}]}}'
    return f'{{"instances": [{json.dumps(instance, separators=(",", ":"))}]}}'


def _example_value(dtype: str, inner: Sequence[int], words: Sequence[str], start: int = 0) -> object:
    """One row of an input: nested lists for its inner dimensions, values of its dtype."""
    if not inner:
        if dtype == "string":
            return words[start % len(words)]
        if dtype == "bool":
            return True
        return 1 if dtype.startswith(("int", "uint")) else 0.5
    width = inner[0] if inner[0] >= 0 else 3
    return [_example_value(dtype, inner[1:], words, start + i) for i in range(width)]


def _table_entries(version_path: str, most: int = 3) -> dict[str, list[str]]:
    """The first entries of each lookup's vocabulary or keys file, by the input clients send
    (``assets.extra/lookups.json``, as the I/O batcher reads it); none when unreadable."""
    extra = os.path.join(version_path, "assets.extra")
    try:
        with open(os.path.join(extra, "lookups.json"), encoding="utf-8") as fh:
            lookups = json.load(fh)["lookups"]
        found = {}
        for lookup in lookups:
            listing = lookup.get("vocabulary") or lookup.get("keys")
            if listing:
                with open(os.path.join(extra, listing), encoding="utf-8") as fh:
                    entries = [line.strip() for _, line in zip(range(most * 4), fh) if line.strip()]
                found[lookup["input"]] = entries[:most]
        return found
    except (OSError, ValueError, KeyError, TypeError):
        return {}
