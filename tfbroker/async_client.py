"""The asyncio client (``tfbroker.client.AsyncClient``): what every HTTP frontend uses.

A plain ZeroMQ socket whose file descriptor is watched by the event loop (``add_reader``),
rather than zmq.asyncio's futures: sends never wait (DEALER, NOBLOCK), and one reader
callback routes every reply to its caller's future. ZeroMQ's descriptor is edge-triggered,
so the socket is drained until EVENTS shows nothing more, after every wake-up and after
every round of sends. Requests made in one loop iteration are sent together at its end, as
one message (a BUNDLE when there are several); the broker answers in kind.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any, Mapping, Sequence

import zmq

from tfbroker.wire import protocol
from tfbroker.runtime.settings import DEFAULT_HEARTBEAT_INTERVAL_S, DEFAULT_HEARTBEAT_LIVENESS
from tfbroker.wire.errors import DeadlineExceeded, Internal, Unavailable
from tfbroker.wire.zmqio import NOBLOCK, POLLIN, POLLOUT, events, recv_message, send_message
from tfbroker.client import (DEFAULT_TIMEOUT_S, GRACE_S, ClientBase, Prediction, as_dict, decode_reply,
                             encode_cancel, encode_reload, health_reply, new_socket, prediction, read_answers)

# While requests wait, a silent broker gets a heartbeat each interval and is given up after
# liveness silent intervals (its pending requests then fail with Unavailable).
HEARTBEAT_INTERVAL_S = DEFAULT_HEARTBEAT_INTERVAL_S
HEARTBEAT_LIVENESS = DEFAULT_HEARTBEAT_LIVENESS
# Messages sent as one BUNDLE at most: a burst larger than this goes as several.
MAX_BUNDLE = 256
# This process's pid, kept current across forks (gunicorn forks the frontends from a
# preloaded app): comparing it costs nothing, os.getpid() is a system call per request.
_process = [os.getpid()]
os.register_at_fork(after_in_child=lambda: _process.__setitem__(0, os.getpid()))


class AsyncClient(ClientBase):
    """asyncio client: one DEALER socket per process and event loop, replies matched by id."""

    def __init__(self, address: str | None = None, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 connect_timeout_s: float = 1.0, rest_api_port: int | None = None,
                 runtime_dir: str | None = None, continue_traces: bool = True) -> None:
        super().__init__(address, timeout_s=timeout_s, connect_timeout_s=connect_timeout_s,
                         rest_api_port=rest_api_port, runtime_dir=runtime_dir, continue_traces=continue_traces)
        self._pid = 0
        self._context: zmq.Context[Any] | None = None
        self._socket: zmq.Socket[Any] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._heartbeat: asyncio.TimerHandle | None = None
        self._pending: dict[int, asyncio.Future[protocol.Message | Prediction]] = {}
        # Each waiting request's last moment (loop time) and deadline: swept every heartbeat
        # interval rather than one timer per request, since the broker answers 504 itself at
        # the deadline; this only catches a broker that never answers.
        self._deadlines: dict[int, tuple[float, float]] = {}
        self._writable = False  # the socket has been connected once
        self._outbox: list[tuple[list[Any], asyncio.Future[protocol.Message | Prediction]]] = []
        self._last_heard = 0.0

    async def predict(self, model: str, inputs: Mapping[str, Any], *, version: int | None = None,
                      label: str | None = None, signature_name: str = "serving_default",
                      timeout_s: float | None = None, exact_dtypes: bool = False,
                      traceparent: str | None = None) -> Prediction:
        """``exact_dtypes``: refuse a tensor whose dtype is not its input's (TF Serving's gRPC
        rule), instead of casting as TF Serving's JSON API does. ``traceparent``: the W3C
        trace context to continue, instead of the caller's current span (a frontend's own)."""
        if traceparent is None and self.continue_traces:  # (a frontend's calls skip this: no context manager)
            with self._caller_span("predict", model) as caller:
                return prediction(await self.request(*self._predict_call(
                    model, inputs, version, label, signature_name, timeout_s, exact_dtypes=exact_dtypes, trace=caller)))
        return prediction(await self.request(*self._predict_call(model, inputs, version, label, signature_name,
                                                                 timeout_s, exact_dtypes=exact_dtypes,
                                                                 trace=traceparent)))

    async def classify(self, model: str, examples: Sequence[bytes], *, version: int | None = None,
                       label: str | None = None, signature_name: str = "serving_default",
                       timeout_s: float | None = None, traceparent: str | None = None) -> Prediction:
        """Run a classify signature on serialized tf.Examples; the outputs (classes, scores)."""
        return await self._examples("classify", model, examples, version, label, signature_name, timeout_s,
                                    traceparent)

    async def regress(self, model: str, examples: Sequence[bytes], *, version: int | None = None,
                      label: str | None = None, signature_name: str = "serving_default",
                      timeout_s: float | None = None, traceparent: str | None = None) -> Prediction:
        """Run a regress signature on serialized tf.Examples; the outputs (outputs)."""
        return await self._examples("regress", model, examples, version, label, signature_name, timeout_s,
                                    traceparent)

    async def _examples(self, method: str, model: str, examples: Sequence[bytes], version: int | None,
                        label: str | None, signature_name: str, timeout_s: float | None,
                        traceparent: str | None) -> Prediction:
        if traceparent is None and self.continue_traces:
            with self._caller_span(method, model) as caller:
                return prediction(await self.request(*self._examples_call(
                    method, model, examples, version, label, signature_name, timeout_s, caller)))
        return prediction(await self.request(*self._examples_call(method, model, examples, version, label,
                                                                  signature_name, timeout_s, traceparent)))

    async def metadata(self, model: str, *, version: int | None = None, label: str | None = None) -> dict[str, Any]:
        return as_dict(await self.request(*self._query_call(protocol.METADATA, model, version, label)))

    async def status(self, model: str, *, version: int | None = None, label: str | None = None) -> dict[str, Any]:
        return as_dict(await self.request(*self._query_call(protocol.STATUS, model, version, label)))

    async def reload_config(self, config: str) -> dict[str, Any]:
        """Replace the served models with those of ``config`` (a ModelServerConfig in TF
        Serving's text format), as TF Serving's HandleReloadConfigRequest; what changed."""
        request_id = next(self._ids)
        reply = as_dict(await self.request(request_id, encode_reload(request_id, config), self.timeout_s))
        return dict(reply["body"])

    async def health(self, model: str | None = None, *, version: int | None = None, label: str | None = None
                     ) -> protocol.HealthReply:
        """Whether the broker serves (see Client.health)."""
        return health_reply(await self.request(*self._query_call(protocol.HEALTH, model, version, label)))

    async def request_logging(self) -> dict[str, Any]:
        """The request logs to write: each model's logging_config (frontend/request_log.py)."""
        return dict(as_dict(await self.request(*self._query_call(protocol.LOGGING)))["body"])

    async def repository(self, op: str, model: str | None = None, *, ready_only: bool = False) -> dict[str, Any]:
        """The model repository extension: ``index`` (``{"models": [...]}``), ``load`` or
        ``unload`` a model (``{"changes": ...}``)."""
        request_id = next(self._ids)
        header = protocol.Repository(id=request_id, op=op, model=model, ready_only=ready_only)  # type: ignore[arg-type]
        reply = as_dict(await self.request(request_id, protocol.encode(protocol.REPOSITORY, header), self.timeout_s))
        return dict(reply["body"])

    async def stats(self) -> dict[str, Any]:
        """The broker's counters (see Client.stats)."""
        return as_dict(await self.request(*self._query_call(protocol.STATS)))

    async def stats_reply(self) -> protocol.StatsReply:
        """All the broker's figures: counters, each version's, and its processes' (metrics)."""
        reply = decode_reply(await self.request(*self._query_call(protocol.STATS)))
        if not isinstance(reply, protocol.StatsReply):
            raise Internal("the broker answered STATS with something else")
        return reply

    async def request(self, request_id: int, frames: list[Any], timeout_s: float) -> protocol.Message | Prediction:
        """Send one message and wait for its answer: the transport seam of this client."""
        sock, loop = self._ensure_socket()
        future: asyncio.Future[protocol.Message | Prediction] = loop.create_future()
        self._pending[request_id] = future
        self._deadlines[request_id] = (loop.time() + timeout_s + GRACE_S, timeout_s)
        try:
            if not self._writable:
                # Not connected yet (IMMEDIATE): give the connection a moment, then give up.
                # Once connected, a broker that goes away makes the send fail (Unavailable).
                await self._wait_writable(sock)
                self._writable = True
            self._outbox.append((frames, future))
            if len(self._outbox) == 1:
                loop.call_soon(self._flush)
            return await future
        except (asyncio.CancelledError, DeadlineExceeded):
            # The caller gave up (an HTTP client went away, a timeout): the broker drops the
            # request if it has not been dispatched, so it costs no batch slot or device time.
            self._cancel(request_id)
            raise
        finally:
            self._pending.pop(request_id, None)
            self._deadlines.pop(request_id, None)

    def _cancel(self, request_id: int) -> None:
        if self._socket is not None:
            try:
                send_message(self._socket, encode_cancel(request_id), NOBLOCK)
            except zmq.Again:
                pass

    def _flush(self) -> None:
        """Send what this loop iteration queued as one message (a BUNDLE when there are
        several): ZeroMQ and the broker then pay once for the lot instead of once per
        request (the largest cost of both, per request, before)."""
        outbox, self._outbox = self._outbox, []
        waiting = [(frames, future) for frames, future in outbox if not future.done()]
        sock = self._socket
        for start in range(0, len(waiting), MAX_BUNDLE):
            chunk = waiting[start:start + MAX_BUNDLE]
            try:
                if sock is None:
                    raise zmq.Again()
                send_message(sock, protocol.bundle([frames[1:] for frames, _ in chunk]), NOBLOCK)
            except zmq.Again:
                for _, future in chunk:
                    if not future.done():
                        future.set_exception(Unavailable(f"the broker at {self.address} is not reachable"))
        self._drain()

    def close(self) -> None:
        self._reset(Unavailable("the client was closed"))
        if self._context is not None:
            self._context.destroy(linger=0)
            self._context = None
        self._pid = 0

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    # --- implementation ---

    def _ensure_socket(self) -> tuple[zmq.Socket[Any], asyncio.AbstractEventLoop]:
        loop = asyncio.get_running_loop()
        if self._pid != _process[0]:  # first use, or first use after a fork
            self._pid = _process[0]
            self._context = zmq.Context()
            self._socket = None
            self._pending = {}
        elif self._socket is not None and self._loop is not loop:
            self._reset(Unavailable("the client moved to another event loop"))
        if self._socket is None:
            assert self._context is not None
            self._socket = new_socket(self._context, self.address)
            self._writable = False
            self._loop = loop
            self._last_heard = time.monotonic()
            loop.add_reader(self._socket.fileno(), self._drain)
            self._heartbeat = loop.call_later(HEARTBEAT_INTERVAL_S, self._check_broker)
        return self._socket, loop

    def _drain(self) -> None:
        sock = self._socket
        if sock is None:
            return
        try:
            while events(sock) & POLLIN:
                frames = recv_message(sock, NOBLOCK)  # copies: cheaper than Frame objects when small
                self._last_heard = time.monotonic()
                for request_id, answer in read_answers(frames):
                    future = self._pending.get(request_id)  # type: ignore[arg-type]
                    if future is None or future.done():
                        continue
                    if isinstance(answer, Exception):
                        future.set_exception(answer)
                    else:
                        future.set_result(answer)
        except zmq.Again:
            pass

    async def _wait_writable(self, sock: zmq.Socket[Any]) -> None:
        deadline = time.monotonic() + self.connect_timeout_s
        while not events(sock) & POLLOUT:
            if time.monotonic() > deadline:
                raise Unavailable(f"the broker at {self.address} is not reachable")
            await asyncio.sleep(0.005)

    def _check_broker(self) -> None:
        """Every heartbeat interval: with callers waiting, ping a silent broker, and give up
        on one silent for HEARTBEAT_LIVENESS intervals (fail its callers, fresh socket)."""
        now = time.monotonic()
        self._expire_overdue()
        silent_s = now - self._last_heard
        if not self._pending:
            self._last_heard = now
        elif silent_s > HEARTBEAT_INTERVAL_S * HEARTBEAT_LIVENESS:
            self._reset(Unavailable(f"the broker at {self.address} stopped answering"))
            return
        elif silent_s > HEARTBEAT_INTERVAL_S and self._socket is not None:
            try:
                self._socket.send_multipart(protocol.encode(protocol.HEARTBEAT, protocol.Heartbeat()), zmq.NOBLOCK)
            except zmq.Again:
                pass
            self._drain()
        if self._loop is not None:
            self._heartbeat = self._loop.call_later(HEARTBEAT_INTERVAL_S, self._check_broker)

    def _expire_overdue(self) -> None:
        if self._loop is None:
            return
        now = self._loop.time()
        for request_id, (last, timeout_s) in list(self._deadlines.items()):
            future = self._pending.get(request_id)
            if now >= last and future is not None:
                _expire(future, timeout_s)

    def _reset(self, error: Exception) -> None:
        """Drop the socket (a new one is made on next use) and fail everyone waiting on it."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            self._heartbeat = None
        if self._socket is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._socket.fileno())
            self._socket.close(linger=0)
            self._socket = None
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)
        self._pending.clear()


def _expire(future: asyncio.Future[protocol.Message | Prediction], timeout_s: float) -> None:
    if not future.done():
        future.set_exception(DeadlineExceeded(f"no answer from the broker within {timeout_s:.3g} s"))
