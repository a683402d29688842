"""The public Python client of a tfbroker broker, sync and async, with no TensorFlow.

    from frontend.client import Client
    client = Client("ipc:///run/user/1000/tfbroker-1000/frontend.sock")
    result = client.predict("half_plus_two", {"x": np.array([1.0, 2.0], np.float32)})
    result.outputs["y"], result.version

Clients are safe to create before a fork (gunicorn's preload): sockets are made lazily in
the process, and per thread for ``Client``, per event loop for ``AsyncClient``. Every call
has a deadline; a broker that does not answer gives Unavailable or DeadlineExceeded, never a
hang. Errors are the classes of broker/errors.py, each with its ``http_status``.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import zmq

from broker import protocol
from broker.errors import DeadlineExceeded, ProtocolError, Unavailable, from_code
from broker.zmqio import send_message

DEFAULT_TIMEOUT_S = 30.0
# Extra time the client waits past the deadline it gives the broker, so the broker's own
# 504 (with its reason) normally arrives first.
GRACE_S = 1.0


@dataclass(frozen=True, slots=True)
class Prediction:
    outputs: dict[str, np.ndarray]
    model: str
    version: int


def default_address() -> str:
    """TFBROKER_ADDRESS, or the broker's default ipc:// socket on this host."""
    from broker.config import ADDRESS_ENV, ServerConfig

    return os.environ.get(ADDRESS_ENV) or ServerConfig().resolved_frontend_address


def _request_header(request_id: int, model: str, version: int | None, label: str | None,
                    signature_name: str, timeout_s: float) -> dict[str, Any]:
    header: dict[str, Any] = {"id": request_id, "model": model, "signature": signature_name,
                              "timeout_ms": max(1, int(timeout_s * 1000))}
    if version is not None:
        header["version"] = int(version)
    if label is not None:
        header["label"] = label
    return header


def encode_predict(request_id: int, model: str, inputs: Mapping[str, Any], *, version: int | None,
                   label: str | None, signature_name: str, timeout_s: float) -> list[Any]:
    arrays = {name: value if isinstance(value, np.ndarray) else np.asarray(value)
              for name, value in inputs.items()}
    specs, frames = protocol.encode_tensors(arrays)
    header = _request_header(request_id, model, version, label, signature_name, timeout_s)
    header["inputs"] = specs
    return protocol.encode(protocol.REQUEST, header, frames)


def encode_query(command: bytes, request_id: int, model: str | None, version: int | None,
                 label: str | None) -> list[Any]:
    header: dict[str, Any] = {"id": request_id}
    if model is not None:
        header["model"] = model
    if version is not None:
        header["version"] = int(version)
    if label is not None:
        header["label"] = label
    return protocol.encode(command, header)


def decode_reply(message: protocol.Message) -> dict[str, Any]:
    """The REPLY header (with ``tensors`` decoded, for predictions), or the error raised."""
    if message.command == protocol.ERROR:
        raise from_code(int(message.header.get("code", 500)), str(message.header.get("message", "")))
    if message.command != protocol.REPLY:
        raise ProtocolError(f"unexpected command {message.command!r} in a reply")
    header = message.header
    if "outputs" in header:
        header["tensors"] = protocol.decode_tensors(header["outputs"], message.frames)
    return header


def prediction(reply: dict[str, Any]) -> Prediction:
    return Prediction(reply["tensors"], reply["model"], int(reply["version"]))


def new_socket(context: zmq.Context, address: str) -> zmq.Socket:
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    # Queue only to a connected broker: with none, send fails at once (Unavailable).
    sock.setsockopt(zmq.IMMEDIATE, 1)
    sock.connect(address)
    return sock


class ClientBase:
    """What the sync and async clients share: settings, request ids and message building."""

    def __init__(self, address: str | None = None, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 connect_timeout_s: float = 1.0) -> None:
        self.address = address or default_address()
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self._ids = itertools.count(1)

    def _predict_call(self, model: str, inputs: Mapping[str, Any], version: int | None, label: str | None,
                      signature_name: str, timeout_s: float | None) -> tuple[int, list[Any], float]:
        timeout_s = timeout_s or self.timeout_s
        request_id = next(self._ids)
        frames = encode_predict(request_id, model, inputs, version=version, label=label,
                                signature_name=signature_name, timeout_s=timeout_s)
        return request_id, frames, timeout_s

    def _query_call(self, command: bytes, model: str | None = None, version: int | None = None,
                    label: str | None = None) -> tuple[int, list[Any], float]:
        request_id = next(self._ids)
        return request_id, encode_query(command, request_id, model, version, label), self.timeout_s


class Client(ClientBase):
    """Blocking client; one socket per thread, so threaded WSGI servers can share one Client."""

    def __init__(self, address: str | None = None, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 connect_timeout_s: float = 1.0) -> None:
        super().__init__(address, timeout_s=timeout_s, connect_timeout_s=connect_timeout_s)
        self._local = threading.local()
        self._pid = 0
        self._context: zmq.Context | None = None
        self._sockets: list[tuple[threading.Thread, zmq.Socket]] = []
        self._lock = threading.Lock()

    def predict(self, model: str, inputs: Mapping[str, Any], *, version: int | None = None,
                label: str | None = None, signature_name: str = "serving_default",
                timeout_s: float | None = None) -> Prediction:
        return prediction(self.request(*self._predict_call(model, inputs, version, label, signature_name,
                                                           timeout_s)))

    def metadata(self, model: str, *, version: int | None = None, label: str | None = None) -> dict[str, Any]:
        return self.request(*self._query_call(protocol.METADATA, model, version, label))

    def status(self, model: str, *, version: int | None = None, label: str | None = None) -> dict[str, Any]:
        return self.request(*self._query_call(protocol.STATUS, model, version, label))

    def stats(self) -> dict[str, Any]:
        """The broker's counters: requests admitted, batches formed (and of those, joined), rows batched."""
        return self.request(*self._query_call(protocol.STATS))

    def request(self, request_id: int, frames: list[Any], timeout_s: float) -> dict[str, Any]:
        """Send one message and wait for its answer: the transport seam of this client."""
        sock = self._thread_socket()
        if not sock.poll(int(self.connect_timeout_s * 1000), zmq.POLLOUT):
            raise Unavailable(f"the broker at {self.address} is not reachable")
        send_message(sock, frames, copy=False)
        deadline = time.monotonic() + timeout_s + GRACE_S
        while True:
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0 or not sock.poll(remaining_ms):
                # A late answer would confuse the next call on this socket: start afresh.
                self._discard(sock)
                raise DeadlineExceeded(f"no answer from the broker within {timeout_s:.3g} s")
            try:
                message = protocol.decode(sock.recv_multipart(copy=False))
            except ProtocolError:
                continue
            if message.header.get("id") == request_id:
                return decode_reply(message)

    def close(self) -> None:
        """Close every thread's socket; the client opens new ones if used again."""
        with self._lock:
            if self._context is not None:
                self._context.destroy(linger=0)
                self._context = None
            self._pid = 0
            self._local = threading.local()
            self._sockets = []

    def _discard(self, sock: zmq.Socket) -> None:
        with self._lock:
            self._sockets = [pair for pair in self._sockets if pair[1] is not sock]
        sock.close(linger=0)
        self._local.socket = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _thread_socket(self) -> zmq.Socket:
        sock = getattr(self._local, "socket", None)
        if sock is not None and self._pid == os.getpid():
            return sock
        with self._lock:
            if self._pid != os.getpid():
                self._pid = os.getpid()
                self._context = zmq.Context()
                self._local = threading.local()
                self._sockets = []
            # Sockets of threads that have ended are closed here, not left to the GC.
            for thread, old in [pair for pair in self._sockets if not pair[0].is_alive()]:
                old.close(linger=0)
                self._sockets.remove((thread, old))
            assert self._context is not None
            sock = self._local.socket = new_socket(self._context, self.address)
            self._sockets.append((threading.current_thread(), sock))
        return sock


from frontend.async_client import AsyncClient  # noqa: E402 - re-exported: one public module

__all__ = ["AsyncClient", "Client", "ClientBase", "Prediction", "default_address"]
