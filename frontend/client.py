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

import asyncio
import itertools
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import zmq
import zmq.asyncio

from broker import protocol
from broker.errors import DeadlineExceeded, ProtocolError, Unavailable, from_code

DEFAULT_TIMEOUT_S = 30.0
# Extra time the client waits past the deadline it gives the broker, so the broker's own
# 504 (with its reason) normally arrives first.
GRACE_S = 1.0
# While requests wait, a silent broker gets a heartbeat each interval and is given up after
# this many silent intervals (its pending requests then fail with Unavailable).
HEARTBEAT_INTERVAL_S = 1.0
HEARTBEAT_LIVENESS = 5


@dataclass(frozen=True, slots=True)
class Prediction:
    outputs: dict[str, np.ndarray]
    model: str
    version: int


def default_address() -> str:
    """TFBROKER_ADDRESS, or the broker's default ipc:// socket on this host."""
    from broker.config import ServerConfig

    return os.environ.get("TFBROKER_ADDRESS") or ServerConfig().resolved_frontend_address


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


def encode_query(command: bytes, request_id: int, model: str, version: int | None,
                 label: str | None) -> list[Any]:
    header: dict[str, Any] = {"id": request_id, "model": model}
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


def _prediction(reply: dict[str, Any]) -> Prediction:
    return Prediction(reply["tensors"], reply["model"], int(reply["version"]))


def _new_socket(context: zmq.Context, address: str) -> zmq.Socket:
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    # Queue only to a connected broker: with none, send fails at once (Unavailable).
    sock.setsockopt(zmq.IMMEDIATE, 1)
    sock.connect(address)
    return sock


class AsyncClient:
    """asyncio client: one DEALER socket per event loop, replies matched by request id."""

    def __init__(self, address: str | None = None, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 connect_timeout_s: float = 1.0) -> None:
        self.address = address or default_address()
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self._ids = itertools.count(1)
        self._pid = 0
        self._context: zmq.asyncio.Context | None = None
        self._socket: zmq.asyncio.Socket | None = None
        self._pending: dict[int, asyncio.Future[protocol.Message]] = {}
        self._reader: asyncio.Task[None] | None = None

    async def predict(self, model: str, inputs: Mapping[str, Any], *, version: int | None = None,
                      label: str | None = None, signature_name: str = "serving_default",
                      timeout_s: float | None = None) -> Prediction:
        timeout_s = timeout_s or self.timeout_s
        request_id = next(self._ids)
        frames = encode_predict(request_id, model, inputs, version=version, label=label,
                                signature_name=signature_name, timeout_s=timeout_s)
        return _prediction(await self.request(request_id, frames, timeout_s))

    async def metadata(self, model: str, *, version: int | None = None, label: str | None = None) -> dict[str, Any]:
        request_id = next(self._ids)
        frames = encode_query(protocol.METADATA, request_id, model, version, label)
        return await self.request(request_id, frames, self.timeout_s)

    async def status(self, model: str, *, version: int | None = None, label: str | None = None) -> dict[str, Any]:
        request_id = next(self._ids)
        frames = encode_query(protocol.STATUS, request_id, model, version, label)
        return await self.request(request_id, frames, self.timeout_s)

    async def stats(self) -> dict[str, Any]:
        """The broker's counters: requests admitted, batches formed, rows batched."""
        request_id = next(self._ids)
        return await self.request(request_id, protocol.encode(protocol.STATS, {"id": request_id}), self.timeout_s)

    async def request(self, request_id: int, frames: list[Any], timeout_s: float) -> dict[str, Any]:
        """Send one message and wait for its answer: the transport seam of this client."""
        sock = self._ensure_socket()
        future: asyncio.Future[protocol.Message] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            try:
                await sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                # Not connected yet (IMMEDIATE): give the connection a moment, then give up.
                if not await sock.poll(int(self.connect_timeout_s * 1000), zmq.POLLOUT):
                    raise Unavailable(f"the broker at {self.address} is not reachable") from None
                await sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
            try:
                message = await asyncio.wait_for(future, timeout_s + GRACE_S)
            except asyncio.TimeoutError as exc:
                raise DeadlineExceeded(f"no answer from the broker within {timeout_s:.3g} s") from exc
        finally:
            self._pending.pop(request_id, None)
        return decode_reply(message)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            self._reader = None
        self._socket = None
        if self._context is not None:
            self._context.destroy(linger=0)
            self._context = None
            self._pid = 0
        self._fail_pending(Unavailable("the client was closed"))

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    # --- implementation ---

    def _ensure_socket(self) -> zmq.asyncio.Socket:
        if self._pid != os.getpid():  # first use, or first use after a fork
            self._pid = os.getpid()
            self._context = zmq.asyncio.Context()
            self._socket = None
            self._reader = None
            self._pending = {}
        if self._socket is None:
            assert self._context is not None
            self._socket = _new_socket(self._context, self.address)  # type: ignore[assignment]
            self._reader = asyncio.get_running_loop().create_task(self._read(self._socket))
        return self._socket  # type: ignore[return-value]

    async def _read(self, sock: zmq.asyncio.Socket) -> None:
        """Route replies to their callers; with callers waiting and a silent broker, heartbeat,
        and after HEARTBEAT_LIVENESS silent intervals fail them and start a fresh socket."""
        last_heard = time.monotonic()
        while True:
            if await sock.poll(int(HEARTBEAT_INTERVAL_S * 1000), zmq.POLLIN):
                last_heard = time.monotonic()
                while True:
                    try:
                        frames = await sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self._route(frames)
                continue
            now = time.monotonic()
            if not self._pending:
                last_heard = now
            elif now - last_heard > HEARTBEAT_INTERVAL_S * HEARTBEAT_LIVENESS:
                self._fail_pending(Unavailable(f"the broker at {self.address} stopped answering"))
                if self._socket is sock:
                    self._socket = None
                sock.close(linger=0)
                return
            else:
                try:
                    await sock.send_multipart(protocol.encode(protocol.HEARTBEAT, {}), flags=zmq.NOBLOCK)
                except zmq.Again:
                    pass

    def _route(self, frames: list[Any]) -> None:
        try:
            message = protocol.decode(frames)
        except ProtocolError:
            return
        future = self._pending.get(message.header.get("id"))  # type: ignore[arg-type]
        if future is not None and not future.done():
            future.set_result(message)

    def _fail_pending(self, error: Exception) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)
        self._pending.clear()


class Client:
    """Blocking client; one socket per thread, so threaded WSGI servers can share one Client."""

    def __init__(self, address: str | None = None, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 connect_timeout_s: float = 1.0) -> None:
        self.address = address or default_address()
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self._ids = itertools.count(1)
        self._local = threading.local()
        self._pid = 0
        self._context: zmq.Context | None = None
        self._sockets: list[tuple[threading.Thread, zmq.Socket]] = []
        self._lock = threading.Lock()

    def predict(self, model: str, inputs: Mapping[str, Any], *, version: int | None = None,
                label: str | None = None, signature_name: str = "serving_default",
                timeout_s: float | None = None) -> Prediction:
        timeout_s = timeout_s or self.timeout_s
        request_id = next(self._ids)
        frames = encode_predict(request_id, model, inputs, version=version, label=label,
                                signature_name=signature_name, timeout_s=timeout_s)
        return _prediction(self.request(request_id, frames, timeout_s))

    def metadata(self, model: str, *, version: int | None = None, label: str | None = None) -> dict[str, Any]:
        request_id = next(self._ids)
        return self.request(request_id, encode_query(protocol.METADATA, request_id, model, version, label),
                            self.timeout_s)

    def status(self, model: str, *, version: int | None = None, label: str | None = None) -> dict[str, Any]:
        request_id = next(self._ids)
        return self.request(request_id, encode_query(protocol.STATUS, request_id, model, version, label),
                            self.timeout_s)

    def stats(self) -> dict[str, Any]:
        """The broker's counters: requests admitted, batches formed, rows batched."""
        request_id = next(self._ids)
        return self.request(request_id, protocol.encode(protocol.STATS, {"id": request_id}), self.timeout_s)

    def request(self, request_id: int, frames: list[Any], timeout_s: float) -> dict[str, Any]:
        sock = self._thread_socket()
        if not sock.poll(int(self.connect_timeout_s * 1000), zmq.POLLOUT):
            raise Unavailable(f"the broker at {self.address} is not reachable")
        sock.send_multipart(frames, copy=False)
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
            sock = self._local.socket = _new_socket(self._context, self.address)
            self._sockets.append((threading.current_thread(), sock))
        return sock
