"""The broker: one ROUTER for clients, one for workers, one poll loop with a fixed rhythm.

Per tick: handle ready sockets (frontend requests, worker messages), hand due batches to
workers with a free slot, then, every HOUSEKEEPING_S, reap and restart children, expire
silent peers and overdue requests, and send heartbeats. The poll timeout is the nearest of
the next batch deadline and the next housekeeping, never infinite.
"""

from __future__ import annotations

import itertools
import logging
import queue
import signal
import time
from typing import Any

import zmq

from broker import protocol
from broker.batching import Batch, BatchQueue, Task
from broker.config import BatchingParameters, ModelConfig, ServerConfig
from broker.errors import (DeadlineExceeded, InvalidArgument, NotFound, ProtocolError, TFBrokerError,
                           Unavailable)
from broker.control import ControlChannel
from broker.fleet import Fleet
from broker.manager import VersionManager
from broker.models import ServedModel, ServedVersion, WorkerLink, check_inputs
from broker.source import VersionSource
from broker.zmqio import NOBLOCK, recv_message, send_message

log = logging.getLogger("tfbroker.broker")

HOUSEKEEPING_S = 0.05
RECV_BURST = 512  # messages taken from one socket before the other gets its turn


class Pending:
    """A request in the broker: who asked, the frames to forward (header, then tensors), and
    its join key (see check_inputs)."""

    __slots__ = ("client", "request_id", "frames", "join_key")

    def __init__(self, client: bytes, request_id: Any, frames: list[Any], join_key: Any) -> None:
        self.client = client
        self.request_id = request_id
        self.frames = frames
        self.join_key = join_key


class Broker:
    def __init__(self, config: ServerConfig, models: list[ModelConfig], batching: BatchingParameters) -> None:
        self.config = config
        self.batching = batching
        self.models: dict[str, ServedModel] = {}
        self.signals: queue.SimpleQueue[int] = queue.SimpleQueue()
        self.fleet = Fleet(self)
        self.source = VersionSource(config.file_system_poll_wait_seconds)
        self.versions = VersionManager(self)
        self.versions.apply_model_config(models)
        self.requests_admitted = 0
        self.batches_formed = 0
        self.batches_joined = 0  # sent as one tensor per input (see _send_batch)
        self.rows_dispatched = 0
        self._batch_ids = itertools.count(1)
        self._stop_requested_at: float | None = None
        self._stop_now = False
        self._context = zmq.Context()
        self.frontend = self._context.socket(zmq.ROUTER)
        self.backend = self._context.socket(zmq.ROUTER)
        self.control = ControlChannel(self, self._context)
        self._poller = zmq.Poller()
        self._next_housekeeping = 0.0

    # --- life cycle ---

    def handle_signal(self, signum: int, frame: Any) -> None:
        self.signals.put(signum)  # only enqueue: the loop acts on it

    def bind(self) -> None:
        for sock, address in ((self.frontend, self.config.resolved_frontend_address),
                              (self.backend, self.config.resolved_backend_address)):
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.setsockopt(zmq.RCVHWM, 0)
            sock.bind(address)
            self._poller.register(sock, zmq.POLLIN)
        log.info("frontend socket %s, backend socket %s", self.config.resolved_frontend_address,
                 self.config.resolved_backend_address)
        self.control.bind()
        self._poller.register(self.control.socket, zmq.POLLIN)

    def run_forever(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
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
            if now >= self._next_housekeeping:
                self._housekeeping(now)
            self._handle_signals(now)
        self._shutdown()

    def close(self) -> None:
        self._context.destroy(linger=0)

    # --- clients ---

    def _process_frontend(self) -> None:
        for _ in range(RECV_BURST):
            try:
                frames = recv_message(self.frontend, NOBLOCK)
            except zmq.Again:
                return
            client = frames[0]
            try:
                message = protocol.decode(frames[1:])
            except ProtocolError as exc:
                log.warning("malformed message from a client: %s", exc)
                self._reply_error(client, None, InvalidArgument(f"protocol error: {exc}"))
                continue
            try:
                self._handle_client(client, message, frames[3:])
            except (TypeError, ValueError, KeyError, AttributeError) as exc:
                # A header of the wrong shape from one client must not stop the broker.
                log.warning("malformed header from a client: %r", exc)
                self._reply_error(client, message.header.get("id"),
                                  InvalidArgument(f"malformed request header: {exc}"))

    def _handle_client(self, client: bytes, message: protocol.Message, frames: list[Any]) -> None:
        command = message.command
        if command == protocol.REQUEST:
            self._admit(client, message, frames)
        elif command == protocol.HEARTBEAT:
            self.frontend.send_multipart([client, protocol.TAG, protocol.HEARTBEAT, b"\x80"])
        elif command == protocol.METADATA:
            self._answer(client, message.header, self._metadata)
        elif command == protocol.STATUS:
            self._answer(client, message.header, self._status)
        elif command == protocol.STATS:
            self._answer(client, message.header, self._stats)

    def _admit(self, client: bytes, message: protocol.Message, frames: list[Any]) -> None:
        header = message.header
        request_id = header.get("id")
        try:
            served = self._resolve(header)
            signature = header.get("signature") or "serving_default"
            rows, join_key = check_inputs(served, signature, header.get("inputs"), message.frames)
            timeout_ms = header.get("timeout_ms") or self.config.rest_api_timeout_in_ms
            now = time.monotonic()
            task = Task(rows, now + timeout_ms / 1000.0, Pending(client, request_id, frames, join_key))
            queue_ = served.queues.get(signature)
            if queue_ is None:
                queue_ = served.queues[signature] = BatchQueue(self.batching, batching=self.config.enable_batching)
            queue_.schedule(task, now)
            self.requests_admitted += 1
        except TFBrokerError as exc:
            self._reply_error(client, request_id, exc)

    def _model(self, name: Any) -> ServedModel | None:
        return self.models.get(name) if isinstance(name, str) else None

    def _resolve(self, header: dict[str, Any]) -> ServedVersion:
        name = header.get("model")
        model = self._model(name)
        if model is None:
            raise NotFound(f"Servable not found for request: Latest({name})")
        version = header.get("version")
        return model.resolve(int(version) if version is not None else None, header.get("label"))

    def _answer(self, client: bytes, header: dict[str, Any], handler: Any) -> None:
        try:
            body = handler(header)
        except TFBrokerError as exc:
            self._reply_error(client, header.get("id"), exc)
            return
        body["id"] = header.get("id")
        self.frontend.send_multipart([client, protocol.TAG, protocol.REPLY, protocol.packb(body)])

    def _metadata(self, header: dict[str, Any]) -> dict[str, Any]:
        served = self._resolve(header)
        return {"model": served.model, "version": served.version, "signature_def": served.signature_def}

    def _status(self, header: dict[str, Any]) -> dict[str, Any]:
        name = header.get("model")
        model = self._model(name)
        if model is None or not model.versions:
            raise NotFound(f"Could not find any versions of model {name}")
        versions = list(model.versions.values())
        wanted = model.version_of_label(header["label"]) if header.get("label") else header.get("version")
        if wanted is not None:
            versions = [v for v in versions if v.version == int(wanted)]
            if not versions:
                raise NotFound(f"Could not find version {wanted} of model {name}")
        versions.sort(key=lambda v: v.version, reverse=True)
        return {"model": name, "model_version_status": [v.status_json() for v in versions]}

    def _stats(self, header: dict[str, Any]) -> dict[str, Any]:
        return {"requests": self.requests_admitted, "batches": self.batches_formed, "rows": self.rows_dispatched,
                "joined": self.batches_joined}

    def _reply_error(self, client: bytes, request_id: Any, error: TFBrokerError) -> None:
        body = protocol.packb({"id": request_id, "code": error.http_status, "message": error.message})
        send_message(self.frontend, [client, protocol.TAG, protocol.ERROR, body])

    def fail_tasks(self, tasks: Any, error: TFBrokerError) -> None:
        for task in tasks:
            pending: Pending = task.payload
            self._reply_error(pending.client, pending.request_id, error)

    # --- workers ---

    def _process_backend(self) -> None:
        for _ in range(RECV_BURST):
            try:
                frames = self.backend.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            identity = frames[0].bytes
            link = self.fleet.link(identity)
            if link is None:
                log.warning("message from unknown worker %r; telling it to stop", identity)
                self._send_worker(identity, protocol.DISCONNECT, {})
                continue
            link.last_heard = time.monotonic()
            try:
                message = protocol.decode(frames[1:])
            except ProtocolError as exc:
                log.error("malformed message from worker %r: %s", identity, exc)
                continue
            try:
                if message.command == protocol.RESULT:
                    self._deliver(link, message)
                elif message.command == protocol.READY:
                    self.fleet.on_ready(link, message.header)
                elif message.command == protocol.DISCONNECT:
                    self.fleet.on_disconnect(link, message.header)
            except Exception:  # noqa: BLE001 - one worker's bad message must not stop the broker
                log.exception("cannot handle a %r message from worker %r", message.command, identity)

    def _deliver(self, link: WorkerLink, message: protocol.Message) -> None:
        tasks = link.in_flight.pop(message.header.get("batch"), None)
        if tasks is None:
            log.warning("result for an unknown batch from %r", link.identity)
            return
        if "outputs" in message.header:
            self._deliver_joined(link, tasks, message)
            return
        counts = message.header.get("counts", [])
        if len(counts) != len(tasks):
            log.error("worker %r answered %d of %d tasks", link.identity, len(counts), len(tasks))
            self.fail_tasks(tasks, Unavailable("the model worker returned a malformed result"))
            return
        frames = message.frames
        offset = 0
        for task, count in zip(tasks, counts):
            pending: Pending = task.payload
            send_message(self.frontend, [pending.client, protocol.TAG, *frames[offset:offset + count]], copy=False)
            offset += count

    def _deliver_joined(self, link: WorkerLink, tasks: list[Task], message: protocol.Message) -> None:
        """Cut a joined RESULT (one tensor per output, the tasks' rows in order) into replies."""
        header = message.header
        total = sum(t.size for t in tasks)
        try:
            model, version, specs = header["model"], header["version"], header["outputs"]
            if len(specs) != len(message.frames):
                raise ValueError(f"{len(specs)} output specs but {len(message.frames)} frames")
            outputs = []
            for (name, dtype, shape), frame in zip(specs, message.frames):
                view = memoryview(frame)
                if not shape or shape[0] != total or dtype == protocol.STRING or (total and len(view) % total):
                    raise ValueError(f"output {name!r} of shape {shape} for a batch of {total} rows")
                outputs.append((name, dtype, shape[1:], view, len(view) // total if total else 0))
        except (KeyError, TypeError, ValueError) as exc:
            log.error("malformed result from worker %r: %s", link.identity, exc)
            self.fail_tasks(tasks, Unavailable("the model worker returned a malformed result"))
            return
        start = 0
        for task in tasks:
            pending: Pending = task.payload
            rows = task.size
            reply = {"id": pending.request_id, "model": model, "version": version,
                     "outputs": [[name, dtype, [rows, *inner]] for name, dtype, inner, _, _ in outputs]}
            frames = [view[start * row_bytes:(start + rows) * row_bytes] for _, _, _, view, row_bytes in outputs]
            send_message(self.frontend, [pending.client, protocol.TAG, protocol.REPLY, protocol.packb(reply), *frames],
                         copy=False)
            start += rows

    def _dispatch(self, now: float) -> None:
        slots = self.config.batches_in_flight
        for served in self.fleet.serving:
            link = served.worker
            if link is None or not link.ready:
                continue
            queues = list(served.queues.items())
            while len(link.in_flight) < slots:
                for signature, queue_ in queues:
                    batch = queue_.next_batch(now, idle=not link.in_flight)
                    if batch is not None:
                        self._send_batch(served, link, signature, batch, now)
                        break
                else:
                    break

    def _send_batch(self, served: ServedVersion, link: WorkerLink, signature: str, batch: Batch,
                    now: float) -> None:
        live = [t for t in batch.tasks if t.deadline > now]
        if len(live) < len(batch.tasks):
            self.fail_tasks((t for t in batch.tasks if t.deadline <= now),
                            DeadlineExceeded("Deadline exceeded while the request waited in the batch queue"))
        if not live:
            return
        rows = sum(t.size for t in live)
        batch_id = next(self._batch_ids)
        header: dict[str, Any] = {"batch": batch_id, "signature": signature,
                                  "padded_rows": self.batching.padded_size(rows)}
        join_key = live[0].payload.join_key
        frames: list[Any] = []
        if join_key is not None and all(t.payload.join_key == join_key for t in live):
            # One tensor per input for the whole batch: the worker decodes, runs and encodes
            # once per batch instead of once per task.
            self.batches_joined += 1
            header["ids"] = [t.payload.request_id for t in live]
            header["rows"] = [t.size for t in live]
            header["inputs"] = [[name, dtype, [rows, *inner]] for name, dtype, inner in join_key]
            for i in range(1, len(join_key) + 1):
                parts = [t.payload.frames[i] for t in live]
                frames.append(parts[0] if len(parts) == 1 else b"".join(parts))
        else:
            counts = header["counts"] = []
            for task in live:
                frames.extend(task.payload.frames)
                counts.append(len(task.payload.frames))
        self._send_worker(link.identity, protocol.BATCH, header, frames)
        link.in_flight[batch_id] = live
        link.last_sent = now
        self.batches_formed += 1
        self.rows_dispatched += rows

    def _send_worker(self, identity: bytes, command: bytes, header: dict[str, Any], frames: Any = ()) -> None:
        send_message(self.backend, [identity, *protocol.encode(command, header, frames)], copy=False)

    def send_heartbeat(self, link: WorkerLink, now: float) -> None:
        self._send_worker(link.identity, protocol.HEARTBEAT, {})
        link.last_sent = now

    def send_disconnect(self, link: WorkerLink) -> None:
        self._send_worker(link.identity, protocol.DISCONNECT, {})

    # --- rhythm ---

    def _poll_timeout_ms(self) -> int:
        now = time.monotonic()
        nearest = self._next_housekeeping
        for served in self.fleet.serving:
            link = served.worker
            if link is None or len(link.in_flight) >= self.config.batches_in_flight:
                continue
            for queue_ in served.queues.values():
                deadline = queue_.next_deadline()
                if deadline is not None and deadline < nearest:
                    nearest = deadline
        return max(0, int((nearest - now) * 1000 + 0.999))

    def _housekeeping(self, now: float) -> None:
        self._next_housekeeping = now + HOUSEKEEPING_S
        self.fleet.manage(now)
        if self._stop_requested_at is None:
            self.control.poll_config(now)
            self.source.poll(list(self.models.values()), now)
            self.versions.reconcile(now)
        for served in self.fleet.serving:
            for queue_ in served.queues.values():
                expired = queue_.expire(now)
                if expired:
                    self.fail_tasks(expired, DeadlineExceeded(
                        "Deadline exceeded while the request waited in the batch queue"))

    def _handle_signals(self, now: float) -> None:
        while not self.signals.empty():
            signum = self.signals.get()
            if self._stop_requested_at is None:
                log.info("received %s; draining the frontends, then stopping", signal.Signals(signum).name)
                self._stop_requested_at = now
                self.fleet.stop_frontends()
            else:
                log.info("received %s again; stopping now", signal.Signals(signum).name)
                self._stop_now = True
        if self._stop_requested_at is not None and not self._stop_now:
            # Keep serving while the frontends finish their open requests, within the grace time.
            idle = not self.fleet.frontends_running() and not any(s.has_work() for s in self.fleet.serving)
            self._stop_now = idle or now - self._stop_requested_at > self.config.shutdown_grace_s

    def _shutdown(self) -> None:
        self.fleet.stop()
        for served in self.fleet.serving:
            self.fail_version(served, Unavailable("the server is shutting down"))
        log.info("stopped")

    def fail_version(self, served: ServedVersion, error: TFBrokerError) -> None:
        """Answer every request queued for or running on ``served`` with ``error``."""
        for queue_ in served.queues.values():
            self.fail_tasks(queue_.drain(), error)
        if served.worker is not None:
            for tasks in served.worker.in_flight.values():
                self.fail_tasks(tasks, error)
            served.worker.in_flight.clear()


