"""Dispatch and delivery: due batches to a version's least loaded READY replica, and the
replies cut from its results back to their clients.

A replica holds at most ``batches_in_flight`` batches, so the device never waits for
Python and a lost worker costs little. Batches leave through ``send`` (the backend socket's
sender) and replies through the InFlight owner, so this runs in unit tests without sockets.
"""

from __future__ import annotations

import itertools
import logging
import time
from typing import Any, Iterable, Sequence

from broker.batch_codec import build_batch, by_client, cut_joined_result, split_task_result
from broker.batching import Batch
from broker.config import BatchingParameters
from broker.inflight import InFlight
from broker.links import SendToChild, WorkerLink
from broker.models import ServedVersion
from broker.traces import NO_SPANS, BatchSpans
from tfbroker.wire import protocol
from tfbroker.wire.errors import Internal

log = logging.getLogger("tfbroker.broker")


class Dispatcher:
    def __init__(self, inflight: InFlight, send: SendToChild, batching: BatchingParameters, *,
                 batches_in_flight: int, spans: BatchSpans | None = None) -> None:
        self._inflight = inflight
        self._spans = spans  # when tracing
        self._send = send
        self._batching = batching
        self._slots = batches_in_flight
        self._batch_ids = itertools.count(1)

    def dispatch(self, serving: Iterable[ServedVersion], now: float) -> None:
        """Each version's batches to its least loaded READY replica with a free slot."""
        for served in serving:
            ready = served.ready_links()
            if not ready or not served.queues:
                continue
            queues = list(served.queues.items())
            while True:
                link = (min(ready, key=lambda lk: len(lk.in_flight) + (self._slots if lk.isolating else 0))
                        if len(ready) > 1 else ready[0])
                if len(link.in_flight) >= self._slots or link.isolating:
                    break
                for signature, queue_ in queues:
                    batch = queue_.next_batch(now, idle=not link.in_flight)
                    if batch is not None:
                        self._send_batch(served, link, signature, batch, now)
                        break
                else:
                    break

    def next_deadline(self, serving: Iterable[ServedVersion], nearest: float) -> float:
        """The nearest batch deadline of a version with a free slot, if before ``nearest``."""
        for served in serving:
            if not any(link is not None and len(link.in_flight) < self._slots for link in served.workers):
                continue
            for queue_ in served.queues.values():
                deadline = queue_.next_deadline()
                if deadline is not None and deadline < nearest:
                    nearest = deadline
        return nearest

    def deliver(self, link: WorkerLink, message: protocol.Message) -> bool:
        """A worker's result, cut into one reply per request; False when it was malformed
        (its requests get 500) or for no batch the worker holds."""
        result = message.header
        entry = link.in_flight.pop(result.batch, None)
        sent = link.sent.pop(result.batch, None)
        if sent is not None and entry is not None:
            sent_at, processed_rows, counters, spans = sent
            now = time.monotonic()
            counters.record_stages(result, now - sent_at, processed_rows, len(entry[1]))
            if spans and self._spans is not None:
                self._spans.close(spans, now, attributes={"tfbroker.worker_us.input": result.input_us,
                                                          "tfbroker.worker_us.model": result.model_us,
                                                          "tfbroker.worker_us.output": result.output_us})
        if link.isolating == result.batch:
            link.isolating = 0
        if entry is None:
            log.warning("result for an unknown batch from %r", link.identity)
            return False
        tasks = entry[1]
        try:
            if isinstance(result, protocol.JoinedResult):
                answers = cut_joined_result(result, message.frames, tasks)
            else:
                answers = [([task], reply) for task, reply in zip(tasks, split_task_result(result, message.frames, tasks))]
        except ValueError as exc:
            self._inflight.counters["malformed_worker"] += 1
            log.error("malformed result from worker %r: %s", link.identity, exc)
            self._inflight.fail(tasks, Internal("the model worker returned a malformed result"))
            return False
        for answered, reply in answers:
            if len(answered) == 1:
                self._inflight.reply(answered[0], reply)
            else:
                self._inflight.reply_rows(answered, reply)
        return True

    # --- implementation ---

    def _send_batch(self, served: ServedVersion, link: WorkerLink, signature: str, batch: Batch,
                    now: float) -> None:
        live = self._inflight.take_live(batch.tasks, now)
        if not live:
            return
        live = by_client(live)
        rows = sum(t.size for t in live)
        batch_id = next(self._batch_ids)
        padded_rows = (served.batching or self._batching).padded_size(rows)
        header, frames = build_batch(batch_id, signature, padded_rows, live, now)
        spans: Sequence[Any] = NO_SPANS
        if self._spans is not None:
            header.traces, spans = self._spans.open(live, now, {  # type: ignore[attr-defined]
                "model.name": served.model, "model.version": served.version, "tfbroker.batch": batch_id,
                "tfbroker.batch_rows": rows, "tfbroker.padded_rows": max(rows, padded_rows),
                "tfbroker.batch_tasks": len(live), "tfbroker.batch_exit": batch.exit_reason or "idle"})
        self._send(link.identity, protocol.BATCH, header, frames)
        link.in_flight[batch_id] = (signature, live)
        link.sent[batch_id] = (now, max(rows, padded_rows), served.counters, spans)
        if batch.suspect:
            link.isolating = batch_id
        link.batches += 1
        link.last_sent = now
        counters = self._inflight.counters
        counters["batches"] += 1
        counters["rows"] += rows
        counters["joined"] += isinstance(header, protocol.JoinedBatch)
        closed = batch.closed_at
        served.counters.record_batch(rows, max(rows, padded_rows), batch.exit_reason or "idle", [t.size for t in live],
                                     [now - task.payload.admitted for task in live],
                                     [max(0.0, closed - task.payload.admitted) if closed else 0.0 for task in live])
