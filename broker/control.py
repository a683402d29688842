"""The broker's control channel: what ``python -m broker.ctl`` asks for, on its own ROUTER.

Operations (the ``op`` of a CONTROL message, tfbroker/wire/protocol.py): ``status``,
``reload-config``, ``load``, ``unload``, ``label``, ``drain``. The socket listens on ipc://
(mode 0600) by default; anything reachable from other hosts needs CURVE (tfbroker/wire/security.py),
and then only holders of an allowed key pair get an answer.
The model config file is also re-read here every ``model_config_file_poll_wait_seconds``.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable

import msgspec
import zmq

from tfbroker.wire import protocol
from broker.config import ServerConfig
from broker.config_files import load_model_config, parse_model_config
from tfbroker.wire.errors import InvalidArgument, ProtocolError, TFBrokerError
from broker.manager import VersionManager
from broker.models import ServedVersion

log = logging.getLogger("tfbroker.control")


class ControlChannel:
    def __init__(self, config: ServerConfig, versions: VersionManager, counters: Callable[[], dict[str, int]],
                 context: zmq.Context, *, zygote_status: Callable[[], dict[str, Any]] | None = None) -> None:
        self.config = config
        self._versions = versions
        self._counters = counters  # the broker's counters, for status
        self._zygote_status = zygote_status
        self.socket = context.socket(zmq.ROUTER)
        self._config_text = ""
        self._next_config_poll = float("inf")
        self._started = time.monotonic()
        self._ops: dict[str, Callable[[protocol.ControlArgs], dict[str, Any]]] = {
            "status": self._status,
            "reload-config": lambda args: {"changes": self.reload_config()},
            "load": lambda args: self._message(self._versions.load_by_hand(*_model_version(args))),
            "unload": lambda args: self._message(self._versions.unload_by_hand(*_model_version(args))),
            "label": self._label,
            "drain": lambda args: self._message(self._versions.drain(*_model_version(args))),
        }

    def bind(self) -> None:
        address = self.config.resolved_control_address
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(address)
        if address.startswith("ipc://"):
            os.chmod(address[len("ipc://"):], 0o600)  # only this user may drive the broker
        log.info("control socket %s", address)

    def start(self, now: float) -> None:
        if self.config.model_config_file:
            self._config_text = _read_text(self.config.model_config_file)
            if self.config.model_config_file_poll_wait_seconds > 0:
                self._next_config_poll = now + self.config.model_config_file_poll_wait_seconds

    def process(self) -> None:
        while True:
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            client, request_id = frames[0], protocol.salvage_id(frames[1:])
            try:
                message = protocol.decode(frames[1:], protocol.CTL_TO_BROKER)
                header: protocol.Control = message.header
                log.log(logging.DEBUG if header.op == "status" else logging.INFO, "control: %s %s", header.op,
                        msgspec.json.encode(header.args).decode())
                body = self._ops[header.op](header.args)
            except ProtocolError as exc:  # malformed: answer, keep serving
                self._send(client, protocol.ERROR, protocol.Error(
                    id=request_id, code=400, message=f"malformed control message: {exc}"))
            except TFBrokerError as exc:
                self._send(client, protocol.ERROR, protocol.Error(id=request_id, code=exc.http_status,
                                                                  message=exc.message))
            else:
                self._send(client, protocol.REPLY, protocol.ControlReply(id=header.id, body=body))

    def _send(self, client: bytes, command: bytes, header: protocol.Header) -> None:
        self.socket.send_multipart([client, *protocol.encode(command, header)])

    def poll_config(self, now: float) -> None:
        if now < self._next_config_poll:
            return
        self._next_config_poll = now + self.config.model_config_file_poll_wait_seconds
        if _read_text(self.config.model_config_file) != self._config_text:
            try:
                self.reload_config()
            except TFBrokerError as exc:
                log.error("%s", exc.message)

    def reload_text(self, text: str, source: str = "ReloadConfigRequest") -> list[str]:
        """A ModelServerConfig sent by a client (gRPC's HandleReloadConfigRequest): the served
        models become its models; a config that does not parse changes nothing."""
        try:
            models = parse_model_config(text, source=source)
        except ValueError as exc:
            raise InvalidArgument(f"model config not reloaded, the old one stays in force: {exc}") from exc
        changes = self._versions.apply_model_config(models)
        log.info("reloaded the model config from %s: %s", source, "; ".join(changes) or "no change")
        return changes

    def reload_config(self) -> list[str]:
        """Re-read --model_config_file; a file that does not parse changes nothing."""
        path = self.config.model_config_file
        if not path:
            raise InvalidArgument("the broker was started without --model_config_file: nothing to reload")
        text = _read_text(path)
        try:
            models = load_model_config(path)
        except ValueError as exc:
            self._config_text = text  # report a broken file once, not at every poll
            raise InvalidArgument(f"model config not reloaded, the old one stays in force: {exc}") from exc
        self._config_text = text
        changes = self._versions.apply_model_config(models)
        log.info("reloaded %s: %s", path, "; ".join(changes) or "no change")
        return changes

    # --- implementation ---

    def repository(self, header: protocol.Repository) -> dict[str, Any]:
        """The Open Inference Protocol's model repository extension, from a client: the index
        always; load and unload only with --enable_model_control (Triton's explicit mode)."""
        if header.op == "index":
            return {"models": self.repository_index(header.ready_only)}
        if not self.config.enable_model_control:
            raise InvalidArgument(f"{header.op} of a model over the API is off: start the broker with "
                                  "--enable_model_control, or use python -m broker.ctl")
        if header.model is None:
            raise InvalidArgument(f"{header.op} needs a model name")
        if header.op == "load":
            return self._message(self._versions.load_model_by_hand(header.model))
        return self._message(self._versions.unload_model_by_hand(header.model))

    def repository_index(self, ready_only: bool) -> list[dict[str, str]]:
        """Every model's versions as Triton's index lists them (READY, LOADING, UNLOADING,
        UNAVAILABLE, with the reason)."""
        index = []
        for model in sorted(self._versions.models.values(), key=lambda m: m.name):
            for served in sorted(model.versions.values(), key=lambda v: v.version):
                state = {"AVAILABLE": "READY", "START": "LOADING", "LOADING": "LOADING",
                         "UNLOADING": "UNLOADING"}.get(served.state.value, "UNAVAILABLE")
                if served.draining and state == "READY":
                    state = "UNAVAILABLE"
                if ready_only and state != "READY":
                    continue
                index.append({"name": model.name, "version": str(served.version), "state": state,
                              "reason": served.error or ("draining" if served.draining else "")})
            if not model.versions and not ready_only:
                index.append({"name": model.name, "version": "", "state": "UNAVAILABLE",
                              "reason": "no version loaded"})
        return index

    def _message(self, text: str) -> dict[str, Any]:
        log.info("%s", text)
        return {"message": text}

    def _label(self, args: protocol.ControlArgs) -> dict[str, Any]:
        name, version = _model_version(args)
        if args.label is None:
            raise InvalidArgument("label needs a model, a label and a version")
        return self._message(self._versions.set_label(name, args.label, version))

    def _status(self, args: protocol.ControlArgs) -> dict[str, Any]:
        return self.status()

    def status(self) -> dict[str, Any]:
        """``broker.ctl status``'s answer (and the status page's models and versions)."""
        models = []
        for model in sorted(self._versions.models.values(), key=lambda m: m.name):
            policy = model.config.model_version_policy
            models.append({
                "name": model.name,
                "base_path": model.config.base_path,
                "version_policy": {"kind": policy.kind, "num_versions": policy.num_versions,
                                   "versions": list(policy.versions)},
                "on_disk": sorted(model.on_disk),
                "aspired": sorted(model.aspired()),
                "labels": dict(sorted(model.labels.items())),
                # labels from the config file or ctl whose version is not AVAILABLE (yet)
                "pending_labels": {k: v for k, v in sorted(model.wanted_labels.items()) if model.labels.get(k) != v},
                "versions": [_version_status(v) for v in sorted(model.versions.values(), key=lambda v: v.version)],
            })
        return {"models": models, "broker": {
            "pid": os.getpid(), "uptime_s": round(time.monotonic() - self._started, 1),
            **self._counters(), "swap_policy": self.config.version_swap_policy,
            "worker_start": self.config.worker_start,
            "zygote": self._zygote_status() if self._zygote_status else None}}


def _version_status(served: ServedVersion) -> dict[str, Any]:
    links = served.links()
    ready = served.ready_links()
    pids = [link.child.pid if link.child.running else None for link in links]
    return {
        "version": served.version,
        "state": served.state.value,
        "error": served.error,
        "draining": served.draining,
        "pid": pids[0] if pids else None,
        "queued": sum(len(q) for q in served.queues.values()),
        "in_flight": sum(1 for link in links for _ in link.tasks()),
        "path": served.path,
        # One worker per device (--devices): where each runs, and whether it takes batches.
        "replicas": [{"device": link.device, "pid": pid, "ready": link in ready, "restarts": link.child.restarts,
                      "started": "forked" if link.child.forked else "spawned",
                      "batches": link.batches,
                      "in_flight": sum(1 for _ in link.tasks())} for link, pid in zip(links, pids)],
    }


def _model_version(args: protocol.ControlArgs) -> tuple[str, int]:
    if args.model is None or args.version is None:
        raise InvalidArgument("this operation needs a model name and a numeric version")
    return args.model, args.version


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except OSError as exc:
        return f"<unreadable: {exc.strerror}>"
