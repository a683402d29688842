"""The one owner of the requests the broker holds, from admission to the reply.

Admission (resolve the version once, check the inputs, queue), the cancel map, expiry,
failure, requeue after a lost worker, the replies and the broker's counters all live here;
the stages (lookups, dispatch, the version manager) hand tasks to it and never answer a
client themselves. Answers leave through ``send`` (the broker's Outbox: one message per
client at the end of the loop's turn), so this runs in unit tests without a socket.
"""

from __future__ import annotations

import collections
import logging
from typing import Any, Callable, Iterable, Mapping

from broker import queries
from broker.batch_codec import join_replies, split_frames
from broker.batching import BatchQueue, Task
from broker.config import BatchingParameters
from broker.models import ServedModel, ServedVersion, WorkerLink, check_inputs, check_method_name
from broker.poison import KILLED_MESSAGE, content_key
from tfbroker.wire import fields, protocol
from tfbroker.wire.tensors import nbytes
from tfbroker.wire.errors import Cancelled, DeadlineExceeded, Internal, InvalidArgument, TFBrokerError, Unavailable

log = logging.getLogger("tfbroker.broker")

COUNTERS = ("requests", "client_messages", "batches", "rows", "joined", "rejected", "expired", "cancelled", "malformed_client",
            "malformed_worker", "failed_handlers", "auth_refused", "requeued", "lookup_batches", "lookup_tasks",
            "lookup_keys", "lookup_unique_keys", "lookup_failed", "isolated", "killed_worker", "refused_poison")

# One answer for a client: (its identity, ``[REPLY|ERROR, header, frames…]``); frames received
# from a worker are forwarded as they came.
Send = Callable[[bytes, list[Any]], None]
# The version's lookup queue for a signature that takes looked-up tensors, else None.
LookupQueueFor = Callable[[ServedVersion, str], "BatchQueue | None"]


class Pending:
    """A request in the broker: who asked, the frames to forward (header, then tensors), its
    join key (see broker.models.check_inputs), its header (admission keeps it for the lookup
    stage and for splitting) and, for a part of a request larger than a batch, its Split."""

    __slots__ = ("client", "request_id", "frames", "join_key", "admitted", "request", "split", "part", "trace")

    def __init__(self, client: bytes, request_id: int, frames: list[Any], join_key: Any, admitted: float,
                 request: protocol.Request | None = None, split: Split | None = None, part: int = 0,
                 trace: str | None = None) -> None:
        self.client = client
        self.request_id = request_id
        self.frames = frames
        self.join_key = join_key
        self.admitted = admitted  # monotonic seconds, for the queueing latency
        self.request = request
        self.split = split
        self.part = part
        self.trace = trace  # the caller's traceparent (broker/traces.py), when its trace is sampled


class Split:
    """A request larger than ``max_batch_size``, cut into parts that run in batches of their
    own (as TF Serving's enable_large_batch_splitting) and answered whole once every part's
    reply is in; the first error answers it alone."""

    __slots__ = ("parts", "replies", "queued", "done")

    def __init__(self, count: int) -> None:
        self.parts: list[Task] = []
        self.replies: list[list[Any] | None] = [None] * count
        self.queued = count  # parts not dispatched yet: the request can still be cancelled
        self.done = False


class InFlight:
    def __init__(self, send: Send, batching: BatchingParameters, *, enable_batching: bool,
                 max_timeout_ms: int, check_method_names: bool = False) -> None:
        self._send = send
        self._check_method_names = check_method_names  # --enable_signature_method_name_check
        self._batching = batching
        self._enable_batching = enable_batching
        self._max_timeout_ms = max_timeout_ms
        self.counters: collections.Counter[str] = collections.Counter({name: 0 for name in COUNTERS})
        self._queued: dict[tuple[bytes, int], tuple[BatchQueue, Task]] = {}  # what a client may still cancel

    # --- admission ---

    def admit(self, client: bytes, header: protocol.Request, frames: list[Any], models: Mapping[str, ServedModel],
              lookup_queue_for: LookupQueueFor, now: float, alike: dict[Any, Any] | None = None) -> None:
        """Pin a request to its version, check it, and queue it (its lookups first, if it has
        any); any refusal is answered at once. ``frames``: its header frame, then its tensors,
        forwarded as they came. ``alike``: a dict kept for the members of one coalesced
        message, so that requests like an earlier one (same model, version, signature and
        input specs) are resolved and checked once: nothing changes between them."""
        try:
            if (client, header.id) in self._queued:
                raise InvalidArgument(f"request id {header.id} is already queued on this connection")
            served, rows, join_key = self._pin(header, frames, models, alike)
            if served.poison:
                refused_s = served.poison.refuses(content_key(header.inputs, frames[1:]), now)
                if refused_s:
                    self.counters["refused_poison"] += 1
                    raise InvalidArgument(f"{KILLED_MESSAGE} earlier: it is refused for {refused_s:.0f} s more")
            timeout_s = min(header.timeout_ms, self._max_timeout_ms) / 1000.0
            task = Task(rows, now + timeout_s, Pending(client, header.id, frames, join_key, now, header,
                                                                 trace=header.trace))
            self.enqueue(served, header.signature, task, now, lookup_queue_for(served, header.signature))
            self.counters["requests"] += 1
        except TFBrokerError as exc:
            if isinstance(exc, Unavailable):
                self.counters["rejected"] += 1
            self.reply_error(client, header.id, exc)

    def _pin(self, header: protocol.Request, frames: list[Any], models: Mapping[str, ServedModel],
             alike: dict[Any, Any] | None) -> tuple[ServedVersion, int, Any]:
        """The request's version, rows and join key (queries.resolve, models.check_inputs)."""
        key = (header.model, header.version, header.label, header.signature, header.method, header.exact_dtypes)
        if alike is not None:
            known = alike.get(key)
            if known is not None and known[0] == header.inputs and len(frames) == len(known[4]) + 1:
                for size, frame in zip(known[4], frames[1:]):
                    if size is not None and len(frame) != size:
                        break
                else:
                    return known[1], known[2], known[3]
        served = queries.resolve(models, header.model, header.version, header.label)
        if self._check_method_names and header.method == "predict":
            check_method_name(served, header.signature)
        rows, join_key = check_inputs(served, header.signature, header.inputs, frames[1:], header.method,
                                      exact_dtypes=header.exact_dtypes)
        if alike is not None:
            alike[key] = (header.inputs, served, rows, join_key, [nbytes(spec) for spec in header.inputs])
        return served, rows, join_key

    def enqueue(self, served: ServedVersion, signature: str, task: Task, now: float,
                queue_: BatchQueue | None = None) -> None:
        """Queue a request for its version's model (or, given, its lookup queue); Unavailable
        when the queue is full."""
        if queue_ is None:
            queue_ = served.queues.get(signature)
            if queue_ is None:
                queue_ = served.queues[signature] = BatchQueue(served.batching or self._batching,
                                                               batching=self._enable_batching)
        limit = queue_.params.max_batch_size
        if queue_.batching and task.size > limit and task.payload.join_key is not None:
            self._schedule_split(served, queue_, task, limit, now)
            return
        try:
            queue_.schedule(task, now)  # a larger task that cannot be split runs in a batch of its own
        except Unavailable:
            served.counters.rejected += 1
            raise
        self._track(queue_, task)

    def cancel(self, client: bytes, request_id: int) -> None:
        """Drop a request its client gave up on, unless it has been dispatched already (a split
        one: its parts still queued)."""
        entry = self._queued.pop((client, request_id), None)
        if entry is None:
            return
        split = entry[1].payload.split
        removed = [part for part in (split.parts if split else [entry[1]]) if entry[0].remove(part)]
        if removed:
            self.counters["cancelled"] += 1
            self.fail(removed[:1], Cancelled("the client cancelled the request"))

    # --- leaving a queue ---

    def take_live(self, tasks: list[Task], now: float) -> list[Task]:
        """The tasks of a batch about to be sent that still have time, no longer cancellable;
        the others are answered 504 before any device time is spent on them."""
        live = [t for t in tasks if t.deadline > now]
        if len(live) < len(tasks):
            self.expire([t for t in tasks if t.deadline <= now])
        for task in live:
            split = task.payload.split
            if split is not None:
                split.queued -= 1
                if split.queued:
                    continue  # other parts still queued: the request stays cancellable
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
                if task.payload.split is not None:
                    task.payload.split.queued += 1
                self._track(queue_, task)
            self.counters["requeued"] += len(again)
        link.take_in_flight()

    def isolate(self, served: ServedVersion, link: WorkerLink, now: float) -> None:
        """A replica died of a fault while running its batches: a request's values may have
        killed it (a kernel that aborts), so they are never run again as they were. Each
        request goes back to the front of its queue as a suspect batch of its own, run alone
        on a worker: the innocent ones are answered, and the one that kills is alone when it
        dies, so it is found at the cost of one more restart (halving the batch instead would
        cost one per halving). That one is answered 400 and its content refused from then on
        (broker/poison.py)."""
        held = list(link.in_flight.values())
        link.take_in_flight()
        if sum(len(tasks) for _, tasks in held) == 1:
            task = held[0][1][0]
            pending: Pending = task.payload
            self.counters["killed_worker"] += 1
            specs = pending.request.inputs if pending.request is not None else []
            served.poison.remember(content_key(specs, pending.frames[1:]), now)
            log.error("model %s version %d: a request killed its worker; its content is refused from now on "
                      "(request %d: %s)", served.model, served.version, pending.request_id,
                      ", ".join(f"{s.name} {s.dtype}{list(s.shape)}" for s in specs))
            self.fail([task], InvalidArgument(KILLED_MESSAGE))
            return
        for signature, tasks in reversed(held):
            queue_ = served.queues[signature]
            for task in reversed(tasks):  # the first ends up first
                queue_.requeue_suspect([task])
                if task.payload.split is not None:
                    task.payload.split.queued += 1
                self._track(queue_, task)
            self.counters["isolated"] += len(tasks)

    # --- answers ---

    def reply(self, task: Task, frames: list[Any]) -> None:
        """A task's answer (``[REPLY|ERROR, header, frames…]``), forwarded as the worker made
        it; a part's is kept until its request's every part has answered."""
        pending: Pending = task.payload
        split = pending.split
        if split is None:
            self._send(pending.client, frames)
            return
        if split.done:
            return
        if bytes(frames[0]) == protocol.ERROR:
            split.done = True
            self._send(pending.client, frames)
            return
        split.replies[pending.part] = frames
        if all(reply is not None for reply in split.replies):
            split.done = True
            try:
                joined = join_replies([r for r in split.replies if r is not None])
            except ValueError as exc:
                self.reply_error(pending.client, pending.request_id, Internal(f"cannot answer a split request: {exc}"))
                return
            self._send(pending.client, joined)

    def reply_rows(self, tasks: list[Task], frames: list[Any]) -> None:
        """One answer (a RowsReply) for several whole requests of one client."""
        self._send(tasks[0].payload.client, frames)

    def reply_error(self, client: bytes, request_id: int | None, error: TFBrokerError) -> None:
        body = protocol.Error(id=request_id, code=error.http_status, message=error.message[:fields.MAX_MESSAGE_CHARS])
        self._send(client, [protocol.ERROR, protocol.encode_header(body)])

    def fail(self, tasks: Iterable[Task], error: TFBrokerError) -> None:
        for task in tasks:
            pending: Pending = task.payload
            self._queued.pop((pending.client, pending.request_id), None)
            if pending.split is not None:
                if pending.split.done:
                    continue  # its request is answered already
                pending.split.done = True
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

    def _schedule_split(self, served: ServedVersion, queue_: BatchQueue, task: Task, limit: int,
                        now: float) -> None:
        """Every part of a large request is queued, or none (503)."""
        pending: Pending = task.payload
        request = pending.request
        if request is None:
            raise Internal("a request to split has lost its header")
        pieces = split_frames(request, pending.frames, task.size, limit)
        split = Split(len(pieces))
        parts = split.parts
        for index, (rows, frames) in enumerate(pieces):
            parts.append(Task(rows, task.deadline, Pending(pending.client, pending.request_id, frames,
                                                           pending.join_key, pending.admitted, request, split, index,
                                                           pending.trace)))
        scheduled = []
        try:
            for part in parts:
                queue_.schedule(part, now)
                scheduled.append(part)
        except Unavailable:
            for part in scheduled:
                queue_.remove(part)
            served.counters.rejected += 1
            raise
        self._queued[(pending.client, pending.request_id)] = (queue_, parts[0])

    def _track(self, queue_: BatchQueue, task: Task) -> None:
        self._queued[(task.payload.client, task.payload.request_id)] = (queue_, task)
