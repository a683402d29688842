"""The one owner of the requests the broker holds, from admission to the reply.

Admission (resolve the version once, check the inputs, queue), the cancel map, expiry,
failure, requeue after a lost worker, the replies and the broker's counters all live here;
the stages (lookups, dispatch, the version manager) hand tasks to it and never answer a
client themselves. Replies leave through ``send``, the frontend socket's sender, so this
runs in unit tests without a socket.
"""

from __future__ import annotations

import collections
import logging
from typing import Any, Callable, Iterable, Mapping

from broker import queries
from broker.batching import BatchQueue, Task
from broker.config import BatchingParameters
from broker.models import ServedModel, ServedVersion, WorkerLink, check_inputs
from tfbroker.wire import protocol
from tfbroker.wire.errors import Cancelled, DeadlineExceeded, InvalidArgument, TFBrokerError, Unavailable

log = logging.getLogger("tfbroker.broker")

COUNTERS = ("requests", "batches", "rows", "joined", "rejected", "expired", "cancelled", "malformed_client",
            "malformed_worker", "failed_handlers", "auth_refused", "requeued", "lookup_batches", "lookup_tasks",
            "lookup_keys", "lookup_unique_keys", "lookup_failed")

# One multipart message to the frontend socket, identity first; copy=False for frames received
# from a worker (forwarded without a copy).
Send = Callable[[list[Any], bool], None]
# The version's lookup queue for a signature that takes looked-up tensors, else None.
LookupQueueFor = Callable[[ServedVersion, str], "BatchQueue | None"]


class Pending:
    """A request in the broker: who asked, the frames to forward (header, then tensors), its
    join key (see broker.models.check_inputs) and, on its way to the lookup stage, its header."""

    __slots__ = ("client", "request_id", "frames", "join_key", "admitted", "request")

    def __init__(self, client: bytes, request_id: int, frames: list[Any], join_key: Any, admitted: float,
                 request: protocol.Request | None = None) -> None:
        self.client = client
        self.request_id = request_id
        self.frames = frames
        self.join_key = join_key
        self.admitted = admitted  # monotonic seconds, for the queueing latency
        self.request = request


class InFlight:
    def __init__(self, send: Send, batching: BatchingParameters, *, enable_batching: bool,
                 max_timeout_ms: int) -> None:
        self._send = send
        self._batching = batching
        self._enable_batching = enable_batching
        self._max_timeout_ms = max_timeout_ms
        self.counters: collections.Counter[str] = collections.Counter({name: 0 for name in COUNTERS})
        self._queued: dict[tuple[bytes, int], tuple[BatchQueue, Task]] = {}  # what a client may still cancel

    # --- admission ---

    def admit(self, client: bytes, header: protocol.Request, frames: list[Any], models: Mapping[str, ServedModel],
              lookup_queue_for: LookupQueueFor, now: float) -> None:
        """Pin a request to its version, check it, and queue it (its lookups first, if it has
        any); any refusal is answered at once. ``frames``: its header frame, then its tensors,
        forwarded as they came."""
        try:
            if (client, header.id) in self._queued:
                raise InvalidArgument(f"request id {header.id} is already queued on this connection")
            served = queries.resolve(models, header.model, header.version, header.label)
            rows, join_key = check_inputs(served, header.signature, header.inputs, frames[1:], header.method)
            timeout_s = min(header.timeout_ms, self._max_timeout_ms) / 1000.0
            task = Task(rows, now + timeout_s, Pending(client, header.id, frames, join_key, now, header))
            self.enqueue(served, header.signature, task, now, lookup_queue_for(served, header.signature))
            self.counters["requests"] += 1
        except TFBrokerError as exc:
            if isinstance(exc, Unavailable):
                self.counters["rejected"] += 1
            self.reply_error(client, header.id, exc)

    def enqueue(self, served: ServedVersion, signature: str, task: Task, now: float,
                queue_: BatchQueue | None = None) -> None:
        """Queue a request for its version's model (or, given, its lookup queue); Unavailable
        when the queue is full."""
        if queue_ is None:
            queue_ = served.queues.get(signature)
            if queue_ is None:
                queue_ = served.queues[signature] = BatchQueue(served.batching or self._batching,
                                                               batching=self._enable_batching)
        try:
            queue_.schedule(task, now)
        except Unavailable:
            served.counters.rejected += 1
            raise
        self._track(queue_, task)

    def cancel(self, client: bytes, request_id: int) -> None:
        """Drop a request its client gave up on, unless it has been dispatched already."""
        entry = self._queued.pop((client, request_id), None)
        if entry is not None and entry[0].remove(entry[1]):
            self.counters["cancelled"] += 1
            self.reply_error(client, request_id, Cancelled("the client cancelled the request"))

    # --- leaving a queue ---

    def take_live(self, tasks: list[Task], now: float) -> list[Task]:
        """The tasks of a batch about to be sent that still have time, no longer cancellable;
        the others are answered 504 before any device time is spent on them."""
        live = [t for t in tasks if t.deadline > now]
        if len(live) < len(tasks):
            self.expire([t for t in tasks if t.deadline <= now])
        for task in live:
            self._queued.pop((task.payload.client, task.payload.request_id), None)
        return live

    def expire(self, tasks: list[Task]) -> None:
        """Tasks whose deadline passed: 504."""
        if tasks:
            self.counters["expired"] += len(tasks)
            self.fail(tasks, DeadlineExceeded())

    def requeue(self, served: ServedVersion, link: WorkerLink) -> None:
        """A replica died or went silent holding batches: they go back to the front of their
        queues for the other replicas; a request requeued once already is failed (a batch
        that kills every worker it reaches must not go round them all)."""
        for signature, tasks in reversed(list(link.in_flight.values())):
            queue_ = served.queues[signature]
            again = queue_.requeue(tasks)
            back = {id(t) for t in again}
            self.fail([t for t in tasks if id(t) not in back],
                      Unavailable("two model workers failed while running this request"))
            for task in again:
                self._track(queue_, task)
            self.counters["requeued"] += len(again)
        link.in_flight.clear()

    # --- answers ---

    def reply(self, client: bytes, frames: list[Any]) -> None:
        """A result, forwarded as the worker made it."""
        self._send([client, protocol.TAG, *frames], False)

    def reply_error(self, client: bytes, request_id: int | None, error: TFBrokerError) -> None:
        body = protocol.Error(id=request_id, code=error.http_status, message=error.message[:protocol.MAX_MESSAGE_CHARS])
        self._send([client, *protocol.encode(protocol.ERROR, body)], True)

    def fail(self, tasks: Iterable[Task], error: TFBrokerError) -> None:
        for task in tasks:
            pending: Pending = task.payload
            self._queued.pop((pending.client, pending.request_id), None)
            self.reply_error(pending.client, pending.request_id, error)

    def fail_version(self, served: ServedVersion, error: TFBrokerError) -> None:
        """Answer every request queued for or running on ``served`` with ``error``, in every stage."""
        if served.lookup_queue is not None:
            self.fail(served.lookup_queue.drain(), error)
        for queue_ in served.queues.values():
            self.fail(queue_.drain(), error)
        for link in served.links():
            self.fail(link.take_in_flight(), error)

    # --- implementation ---

    def _track(self, queue_: BatchQueue, task: Task) -> None:
        self._queued[(task.payload.client, task.payload.request_id)] = (queue_, task)
