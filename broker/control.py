"""The broker's control channel: what ``python -m broker.ctl`` asks for, on its own ROUTER.

Operations (the ``op`` of a CONTROL message, broker/protocol.py): ``status``,
``reload-config``, ``load``, ``unload``, ``label``, ``drain``. The socket listens on ipc://
by default; when ``--control_auth_token_file`` is set, every message must carry that token.
The model config file is also re-read here every ``model_config_file_poll_wait_seconds``.
"""

from __future__ import annotations

import hmac
import logging
import os
import time
from typing import TYPE_CHECKING, Any, Callable

import zmq

from broker import protocol
from broker.config_files import load_model_config
from broker.errors import InvalidArgument, PermissionDenied, TFBrokerError
from broker.models import ServedVersion

if TYPE_CHECKING:
    from broker.server import Broker

log = logging.getLogger("tfbroker.control")


class ControlChannel:
    def __init__(self, broker: Broker, context: zmq.Context) -> None:
        self.broker = broker
        self.config = broker.config
        self.socket = context.socket(zmq.ROUTER)
        self._token = read_token(self.config.control_auth_token_file) if self.config.control_auth_token_file else ""
        self._config_text = ""
        self._next_config_poll = float("inf")
        self._started = time.monotonic()
        self._ops: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
            "status": self._status,
            "reload-config": lambda args: {"changes": self.reload_config()},
            "load": lambda args: self._message(self.broker.versions.load_by_hand(*_model_version(args))),
            "unload": lambda args: self._message(self.broker.versions.unload_by_hand(*_model_version(args))),
            "label": self._label,
            "drain": lambda args: self._message(self.broker.versions.drain(*_model_version(args))),
        }

    def bind(self) -> None:
        address = self.config.resolved_control_address
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(address)
        if address.startswith("ipc://"):
            os.chmod(address[len("ipc://"):], 0o600)  # only this user may drive the broker
        log.info("control socket %s%s", address, " (token required)" if self._token else "")

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
            client, request_id = frames[0], None
            try:
                message = protocol.decode(frames[1:])
                request_id = message.header.get("id")
                if message.command != protocol.CONTROL:
                    raise InvalidArgument(f"the control socket takes CONTROL messages, not {message.command!r}")
                body = self._handle(message.header)
            except TFBrokerError as exc:
                self.socket.send_multipart([client, *protocol.encode(protocol.ERROR, {
                    "id": request_id, "code": exc.http_status, "message": exc.message})])
                continue
            except (ValueError, TypeError, KeyError) as exc:  # malformed: answer, keep serving
                self.socket.send_multipart([client, *protocol.encode(protocol.ERROR, {
                    "id": request_id, "code": 400, "message": f"malformed control message: {exc}"})])
                continue
            body["id"] = request_id
            self.socket.send_multipart([client, *protocol.encode(protocol.REPLY, body)])

    def poll_config(self, now: float) -> None:
        if now < self._next_config_poll:
            return
        self._next_config_poll = now + self.config.model_config_file_poll_wait_seconds
        if _read_text(self.config.model_config_file) != self._config_text:
            try:
                self.reload_config()
            except TFBrokerError as exc:
                log.error("%s", exc.message)

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
        changes = self.broker.versions.apply_model_config(models)
        log.info("reloaded %s: %s", path, "; ".join(changes) or "no change")
        return changes

    # --- implementation ---

    def _handle(self, header: dict[str, Any]) -> dict[str, Any]:
        if self._token and not hmac.compare_digest(str(header.get("token", "")), self._token):
            raise PermissionDenied("control command refused: missing or wrong token")
        op = header.get("op")
        handler = self._ops.get(op) if isinstance(op, str) else None
        if handler is None:
            raise InvalidArgument(f"unknown control operation {op!r}; one of {sorted(self._ops)}")
        args = header.get("args") or {}
        if not isinstance(args, dict):
            raise InvalidArgument("control args must be a map")
        log.log(logging.DEBUG if op == "status" else logging.INFO, "control: %s %s", op, args)
        return handler(args)

    def _message(self, text: str) -> dict[str, Any]:
        log.info("%s", text)
        return {"message": text}

    def _label(self, args: dict[str, Any]) -> dict[str, Any]:
        name, version = _model_version(args)
        return self._message(self.broker.versions.set_label(name, str(args["label"]), version))

    def _status(self, args: dict[str, Any]) -> dict[str, Any]:
        models = []
        for model in sorted(self.broker.models.values(), key=lambda m: m.name):
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
        broker = self.broker
        return {"models": models, "broker": {
            "pid": os.getpid(), "uptime_s": round(time.monotonic() - self._started, 1),
            "requests": broker.requests_admitted, "batches": broker.batches_formed, "rows": broker.rows_dispatched,
            "swap_policy": self.config.version_swap_policy}}


def _version_status(served: ServedVersion) -> dict[str, Any]:
    link = served.worker
    return {
        "version": served.version,
        "state": served.state.value,
        "error": served.error,
        "draining": served.draining,
        "pid": link.child.pid if link is not None and link.child.running else None,
        "queued": sum(len(q) for q in served.queues.values()),
        "in_flight": sum(len(tasks) for tasks in link.in_flight.values()) if link is not None else 0,
        "path": served.path,
    }


def _model_version(args: dict[str, Any]) -> tuple[str, int]:
    try:
        return str(args["model"]), int(args["version"])
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidArgument("this operation needs a model name and a numeric version") from exc


def read_token(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as fh:
            token = fh.read().strip()
    except OSError as exc:
        raise ValueError(f"cannot read control_auth_token_file {path}: {exc.strerror}") from exc
    if len(token) < 16:
        raise ValueError(f"the token in {path} is shorter than 16 characters")
    return token


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except OSError as exc:
        return f"<unreadable: {exc.strerror}>"
