"""The broker: one ROUTER for clients, one for workers, one poll loop with a fixed rhythm.

Per tick: handle ready sockets (frontend requests, worker messages, control commands), hand
due batches to workers with a free slot, then, every HOUSEKEEPING_S, reap and restart
children, expire silent peers and overdue requests, and send heartbeats. The poll timeout is
the nearest of the next batch deadline and the next housekeeping, never infinite.

Nothing a peer sends ends the loop: every message is decoded by broker/protocol.py, a
malformed one is answered (clients) or dropped (workers) and counted, and a handler that
fails anyway answers its request with 500 and logs the traceback.
"""

from __future__ import annotations

import collections
import itertools
import logging
import queue
import signal
import time
from typing import Any, Iterable

import zmq

from broker import protocol, queries
from broker.batching import Batch, BatchQueue, Task
from broker.config import BatchingParameters, ModelConfig, ServerConfig
from broker.control import ControlChannel
from broker.dispatch import Pending, build_batch, cut_joined_result, split_task_result
from broker.errors import (Cancelled, DeadlineExceeded, Internal, InvalidArgument, ProtocolError,
                           TFBrokerError, Unavailable)
from broker.fleet import ACCEPT_DRAIN_S, Fleet
from broker.lookups import COUNTERS as LOOKUP_COUNTERS, LookupStage
from broker.manager import VersionManager
from broker.models import ServedModel, ServedVersion, WorkerLink, check_inputs, version_stats
from broker.security import KeyRing, load_key_pair, make_server, start_authenticator
from broker.source import VersionSource
from broker.stats import process_stats
from broker.zmqio import NOBLOCK, recv_message, send_message

log = logging.getLogger("tfbroker.broker")

HOUSEKEEPING_S = 0.05
RECV_BURST = 512  # messages taken from one socket before the other gets its turn
# Messages ZeroMQ holds per socket before it pushes back: a full receive queue stops
# reading from the peers (their sends fail fast: 503), a full send queue drops replies to a
# client that does not read them. Either way memory stays bounded before admission.
RCVHWM = 20_000
SNDHWM = 100_000
FRAME_OVERHEAD_BYTES = 1 << 16  # a header frame's allowance on top of --max_tensor_bytes
COUNTERS = ("requests", "batches", "rows", "joined", "rejected", "expired", "cancelled", "malformed_client",
            "malformed_worker", "failed_handlers", "auth_refused", "requeued")


class Broker:
    def __init__(self, config: ServerConfig, models: list[ModelConfig], batching: BatchingParameters,
                 metrics_path: str = "") -> None:
        self.config = config
        self.metrics_path = metrics_path  # the Prometheus path the frontends serve ("" none)
        self.batching = batching
        self.models: dict[str, ServedModel] = {}
        self.signals: queue.SimpleQueue[int] = queue.SimpleQueue()
        self.keys = load_key_pair(config.curve_secret_key_file) if config.curve_secret_key_file else None
        self.fleet = Fleet(self)
        self.lookups = LookupStage(self)
        self.source = VersionSource(config.file_system_poll_wait_seconds)
        self.versions = VersionManager(self)
        self.versions.apply_model_config(models)
        self.counters: collections.Counter[str] = collections.Counter(
            {name: 0 for name in (*COUNTERS, *LOOKUP_COUNTERS)})
        self._queued: dict[tuple[bytes, int], tuple[BatchQueue, Task]] = {}  # for CANCEL
        self._batch_ids = itertools.count(1)
        self._stop_requested_at: float | None = None
        self._frontends_stopped = False
        self._stop_now = False
        self._context = zmq.Context()
        self._authenticator: Any = None
        self._key_ring: KeyRing | None = None
        self.frontend = self._context.socket(zmq.ROUTER)
        self.backend = self._context.socket(zmq.ROUTER)
        self.control = ControlChannel(self, self._context)
        self._poller = zmq.Poller()
        self._next_housekeeping = 0.0
        self._last_warning = 0.0

    # --- life cycle ---

    def handle_signal(self, signum: int, frame: Any) -> None:
        self.signals.put(signum)  # only enqueue: the loop acts on it

    def bind(self) -> None:
        if self.keys is not None:
            self._authenticator, self._key_ring = start_authenticator(
                self._context, self.keys, self.config.curve_client_keys_dir)
        for sock in (self.frontend, self.backend, self.control.socket):
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RCVHWM, RCVHWM)
            sock.setsockopt(zmq.SNDHWM, SNDHWM)
            if self.keys is not None:
                make_server(sock, self.keys)
        # A peer that sends a frame larger than any request may hold is disconnected by ZeroMQ
        # before the frame is allocated.
        self.frontend.setsockopt(zmq.MAXMSGSIZE, self.config.limits.max_tensor_bytes + FRAME_OVERHEAD_BYTES)
        for sock, address in ((self.frontend, self.config.resolved_frontend_address),
                              (self.backend, self.config.resolved_backend_address)):
            sock.bind(address)
            self._poller.register(sock, zmq.POLLIN)
        log.info("frontend socket %s, backend socket %s%s", self.config.resolved_frontend_address,
                 self.config.resolved_backend_address, " (CURVE)" if self.keys else "")
        self.control.bind()
        self._poller.register(self.control.socket, zmq.POLLIN)

    def run_forever(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self.handle_signal)
        now = time.monotonic()
        self.source.scan_now(self.models.values(), now)
        self.control.start(now)
        self.versions.reconcile(now)
        self.fleet.start()
        while not self._stop_now:
            events = dict(self._poller.poll(self._poll_timeout_ms()))
            if self.frontend in events:
                self._process_frontend()
            if self.backend in events:
                self._process_backend()
            if self.control.socket in events:
                self.control.process()
            now = time.monotonic()
            self._dispatch(now)
            self.lookups.dispatch(now)
            if now >= self._next_housekeeping:
                self._housekeeping(now)
            self._handle_signals(now)
        self._shutdown()

    def close(self) -> None:
        if self._authenticator is not None:
            self._authenticator.stop()
        self._context.destroy(linger=0)

    def stats(self) -> dict[str, int]:
        if self._key_ring is not None:
            self.counters["auth_refused"] = self._key_ring.refused
        return dict(self.counters)

    # --- clients ---

    def _process_frontend(self) -> None:
        for _ in range(RECV_BURST):
            try:
                frames = recv_message(self.frontend, NOBLOCK)
            except zmq.Again:
                return
            client = frames[0]
            try:
                message = protocol.decode(frames[1:], protocol.CLIENT_TO_BROKER)
            except ProtocolError as exc:
                self.counters["malformed_client"] += 1
                self._warn("malformed message from a client: %s", exc)
                self.reply_error(client, protocol.salvage_id(frames[1:]), InvalidArgument(f"protocol error: {exc}"))
                continue
            try:
                self._handle_client(client, message, frames)
            except Exception as exc:  # noqa: BLE001 - a bug for one request must not stop the broker
                self.counters["failed_handlers"] += 1
                log.exception("cannot handle a %r message from a client", message.command)
                self.reply_error(client, getattr(message.header, "id", None), Internal(f"broker error: {exc}"))

    def _handle_client(self, client: bytes, message: protocol.Message, frames: list[Any]) -> None:
        command, header = message.command, message.header
        if command == protocol.REQUEST:
            self._admit(client, header, frames[3:])
        elif command == protocol.CANCEL:
            self._cancel(client, header.id)
        elif command == protocol.HEARTBEAT:
            send_message(self.frontend, [client, *protocol.encode(protocol.HEARTBEAT, protocol.Heartbeat())])
        else:
            try:
                reply = {protocol.METADATA: lambda h: queries.metadata(self.models, h),
                         protocol.STATUS: lambda h: queries.status(self.models, h),
                         protocol.STATS: self._stats}[command](header)
            except TFBrokerError as exc:
                self.reply_error(client, header.id, exc)
                return
            send_message(self.frontend, [client, *protocol.encode(protocol.REPLY, reply)])

    def _admit(self, client: bytes, header: protocol.Request, frames: list[Any]) -> None:
        """``frames``: the request's header frame, then its tensors, forwarded as they came."""
        try:
            key = (client, header.id)
            if key in self._queued:
                raise InvalidArgument(f"request id {header.id} is already queued on this connection")
            served = queries.resolve(self.models, header.model, header.version, header.label)
            rows, join_key = check_inputs(served, header.signature, header.inputs, frames[1:], header.method)
            now = time.monotonic()
            timeout_s = min(header.timeout_ms, self.config.rest_api_timeout_in_ms) / 1000.0
            task = Task(rows, now + timeout_s, Pending(client, header.id, frames, join_key, now, header))
            self.enqueue(served, header.signature, task, now, self.lookups.queue_for(served, header.signature))
            self.counters["requests"] += 1
        except TFBrokerError as exc:
            if isinstance(exc, Unavailable):
                self.counters["rejected"] += 1
            self.reply_error(client, header.id, exc)

    def enqueue(self, served: ServedVersion, signature: str, task: Task, now: float,
                queue_: BatchQueue | None = None) -> None:
        """Queue an admitted request for its version's model (or, given, its lookup queue);
        Unavailable when the queue is full."""
        if queue_ is None:
            queue_ = served.queues.get(signature)
            if queue_ is None:
                queue_ = served.queues[signature] = BatchQueue(self.batching, batching=self.config.enable_batching)
        try:
            queue_.schedule(task, now)
        except Unavailable:
            served.counters.rejected += 1
            raise
        self.track(queue_, task)

    def track(self, queue_: BatchQueue, task: Task) -> None:
        """A queued task its client may cancel (a requeued one too)."""
        self._queued[(task.payload.client, task.payload.request_id)] = (queue_, task)

    def _cancel(self, client: bytes, request_id: int) -> None:
        """Drop a request its client gave up on, unless it has been dispatched already."""
        entry = self._queued.pop((client, request_id), None)
        if entry is not None and entry[0].remove(entry[1]):
            self.counters["cancelled"] += 1
            self.reply_error(client, request_id, Cancelled("the client cancelled the request"))

    def _stats(self, header: protocol.Query) -> protocol.StatsReply:
        versions = [version_stats(served) for model in self.models.values() for served in model.versions.values()]
        return protocol.StatsReply(id=header.id, counters=self.stats(), versions=versions,
                                   processes=process_stats(self.fleet.pids_by_role()))

    def reply_error(self, client: bytes, request_id: int | None, error: TFBrokerError) -> None:
        body = protocol.Error(id=request_id, code=error.http_status, message=error.message[:protocol.MAX_MESSAGE_CHARS])
        send_message(self.frontend, [client, *protocol.encode(protocol.ERROR, body)])

    def fail_tasks(self, tasks: Iterable[Task], error: TFBrokerError) -> None:
        for task in tasks:
            pending: Pending = task.payload
            self._queued.pop((pending.client, pending.request_id), None)
            self.reply_error(pending.client, pending.request_id, error)

    # --- workers ---

    def _process_backend(self) -> None:
        for _ in range(RECV_BURST):
            try:
                frames = self.backend.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            identity = frames[0].bytes
            link = self.fleet.link(identity)
            io_link = self.lookups.link(identity) if link is None else None
            if link is None and io_link is None:
                self._warn("message from unknown worker %r; telling it to stop", identity)
                self.send_backend(identity, protocol.DISCONNECT, protocol.Disconnect())
                continue
            try:
                message = protocol.decode(frames[1:], protocol.WORKER_TO_BROKER)
            except ProtocolError as exc:
                self.counters["malformed_worker"] += 1
                self._warn("dropping a malformed message from worker %r: %s", identity, exc)
                continue
            try:
                if io_link is not None:
                    io_link.last_heard = time.monotonic()
                    self.lookups.on_message(io_link, message)
                    continue
                assert link is not None
                link.last_heard = time.monotonic()
                header = message.header
                if isinstance(header, (protocol.TaskResult, protocol.JoinedResult)):
                    self._deliver(link, message)
                elif isinstance(header, protocol.Ready):
                    self.fleet.on_ready(link, header)
                elif isinstance(header, protocol.Disconnect):
                    self.fleet.on_disconnect(link, header)
                elif not isinstance(header, protocol.Heartbeat):
                    raise TypeError(f"a model worker does not send {type(header).__name__}")
            except Exception:  # noqa: BLE001 - one worker's bad message must not stop the broker
                self.counters["failed_handlers"] += 1
                log.exception("cannot handle a %r message from worker %r", message.command, identity)

    def _deliver(self, link: WorkerLink, message: protocol.Message) -> None:
        result = message.header
        entry = link.in_flight.pop(result.batch, None)
        if entry is None:
            self._warn("result for an unknown batch from %r", link.identity)
            return
        tasks = entry[1]
        try:
            if isinstance(result, protocol.JoinedResult):
                replies = cut_joined_result(result, message.frames, tasks)
            else:
                replies = split_task_result(result, message.frames, tasks)
        except ValueError as exc:
            self.counters["malformed_worker"] += 1
            log.error("malformed result from worker %r: %s", link.identity, exc)
            self.fail_tasks(tasks, Internal("the model worker returned a malformed result"))
            return
        for task, reply in zip(tasks, replies):
            send_message(self.frontend, [task.payload.client, protocol.TAG, *reply], copy=False)

    def _dispatch(self, now: float) -> None:
        """Each version's batches to its least loaded READY replica with a free slot."""
        slots = self.config.batches_in_flight
        for served in self.fleet.serving:
            ready = [link for link in served.workers if link is not None and link.ready]
            if not ready or not served.queues:
                continue
            queues = list(served.queues.items())
            while True:
                link = min(ready, key=lambda lk: len(lk.in_flight)) if len(ready) > 1 else ready[0]
                if len(link.in_flight) >= slots:
                    break
                for signature, queue_ in queues:
                    batch = queue_.next_batch(now, idle=not link.in_flight)
                    if batch is not None:
                        self._send_batch(served, link, signature, batch, now)
                        break
                else:
                    break

    def drop_expired(self, tasks: list[Task], now: float) -> list[Task]:
        """The tasks with time left, taken off the cancel map; the others are answered 504
        before any device time is spent on them."""
        live = [t for t in tasks if t.deadline > now]
        if len(live) < len(tasks):
            expired = [t for t in tasks if t.deadline <= now]
            self.counters["expired"] += len(expired)
            self.fail_tasks(expired, DeadlineExceeded())
        for task in live:
            self._queued.pop((task.payload.client, task.payload.request_id), None)
        return live

    def _send_batch(self, served: ServedVersion, link: WorkerLink, signature: str, batch: Batch,
                    now: float) -> None:
        live = self.drop_expired(batch.tasks, now)
        if not live:
            return
        rows = sum(t.size for t in live)
        batch_id = next(self._batch_ids)
        header, frames = build_batch(batch_id, signature, self.batching.padded_size(rows), live, now)
        self.send_backend(link.identity, protocol.BATCH, header, frames)
        link.in_flight[batch_id] = (signature, live)
        link.batches += 1
        link.last_sent = now
        self.counters["batches"] += 1
        self.counters["rows"] += rows
        self.counters["joined"] += isinstance(header, protocol.JoinedBatch)
        served.counters.record_batch(rows, [now - task.payload.admitted for task in live])

    def send_backend(self, identity: bytes, command: bytes, header: protocol.Header, frames: Any = ()) -> None:
        send_message(self.backend, [identity, *protocol.encode(command, header, frames)], copy=False)

    def send_heartbeat(self, link: WorkerLink, now: float) -> None:
        self.send_backend(link.identity, protocol.HEARTBEAT, protocol.Heartbeat())
        link.last_sent = now

    def send_disconnect(self, link: WorkerLink) -> None:
        self.send_backend(link.identity, protocol.DISCONNECT, protocol.Disconnect())

    # --- rhythm ---

    def _poll_timeout_ms(self) -> int:
        now = time.monotonic()
        nearest = min(self._next_housekeeping, self.lookups.next_deadline() or self._next_housekeeping)
        for served in self.fleet.serving:
            if not any(link is not None and len(link.in_flight) < self.config.batches_in_flight
                       for link in served.workers):
                continue
            for queue_ in served.queues.values():
                deadline = queue_.next_deadline()
                if deadline is not None and deadline < nearest:
                    nearest = deadline
        return max(0, int((nearest - now) * 1000 + 0.999))

    def _housekeeping(self, now: float) -> None:
        self._next_housekeeping = now + HOUSEKEEPING_S
        self.fleet.manage(now)
        self.lookups.manage(now)
        if self._stop_requested_at is None:
            self.control.poll_config(now)
            self.source.poll(list(self.models.values()), now)
            self.versions.reconcile(now)
        expired = [t for s in self.fleet.serving for q in s.queues.values() for t in q.expire(now)]
        expired += self.lookups.expire(now)
        if expired:
            self.counters["expired"] += len(expired)
            self.fail_tasks(expired, DeadlineExceeded())

    def _handle_signals(self, now: float) -> None:
        while not self.signals.empty():
            signum = self.signals.get()
            if signum == signal.SIGHUP:
                self._reload()
            elif self._stop_requested_at is None:
                log.info("received %s; draining the frontends, then stopping", signal.Signals(signum).name)
                self._stop_requested_at = now
                self.fleet.refuse_connections()
            else:
                log.info("received %s again; stopping now", signal.Signals(signum).name)
                self._stop_now = True
        if self._stop_requested_at is not None and not self._stop_now:
            if not self._frontends_stopped and now - self._stop_requested_at >= ACCEPT_DRAIN_S:
                self._frontends_stopped = True
                self.fleet.stop_frontends()
            # Keep serving while the frontends finish their open requests, within the grace time.
            idle = not self.fleet.frontends_running() and not any(s.has_work() for s in self.fleet.serving)
            self._stop_now = idle or now - self._stop_requested_at > self.config.shutdown_grace_s

    def _reload(self) -> None:
        """SIGHUP, as gunicorn's: re-read the model config, and roll the frontends."""
        log.info("received SIGHUP: reloading the model config and rolling the frontends")
        if self.config.model_config_file:
            try:
                self.control.reload_config()
            except TFBrokerError as exc:
                log.error("%s", exc.message)
        self.fleet.roll_frontends()

    def _shutdown(self) -> None:
        serving = list(self.fleet.serving)
        self.fleet.stop()
        self.lookups.stop()
        for served in serving:
            self.fail_version(served, Unavailable("the server is shutting down"))
        log.info("stopped")

    def fail_version(self, served: ServedVersion, error: TFBrokerError) -> None:
        """Answer every request queued for or running on ``served`` with ``error``."""
        self.lookups.fail_version(served, error)
        for queue_ in served.queues.values():
            self.fail_tasks(queue_.drain(), error)
        for link in served.links():
            self.fail_tasks(link.take_in_flight(), error)

    def _warn(self, text: str, *args: Any) -> None:
        """A warning at most once a second: a peer that floods the broker must not flood the log."""
        now = time.monotonic()
        if now - self._last_warning >= 1.0:
            self._last_warning = now
            log.warning(text, *args)
