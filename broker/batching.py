"""Dynamic batching with TF Serving's semantics: Task, Batch and BatchQueue.

The broker moves frames and never decodes tensors, so a Task is only a size (rows), a
deadline and an opaque payload.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterator

from broker.config import BatchingParameters
from tfbroker.wire.errors import Unavailable


@dataclass(slots=True)
class Task:
    """One admitted request: ``size`` rows, answered before ``deadline`` (monotonic s)."""

    size: int
    deadline: float
    payload: Any = None
    batch: Batch | None = None  # the batch holding it while queued (for remove)
    requeued: bool = False  # was in flight on a worker that died, and queued again


@dataclass(slots=True, eq=False)  # compared by identity: two batches are never the same
class Batch:
    """Tasks that run together. Open while it takes tasks; closed is final."""

    tasks: list[Task] = field(default_factory=list)
    size: int = 0
    start_time: float = 0.0  # when its first task arrived
    closed: bool = False
    # Part of a batch a worker died running: it runs alone on a worker (nothing else in flight
    # there), so that if it kills that worker too, it is known to hold the request that kills.
    suspect: bool = False
    # Why it left the queue (the metrics' batch exits): full (max_batch_size rows, or the next
    # task did not fit), timeout (its first task waited batch_timeout_micros), idle (handed to
    # a worker with nothing to do before either), unbatched (--enable_batching=false), retry
    # (requeued after its worker died). Set when it closes or leaves.
    exit_reason: str = ""
    closed_at: float = 0.0  # when it stopped taking tasks: its requests' wait to fill ends there

    def close(self, reason: str, at: float) -> None:
        self.closed, self.exit_reason, self.closed_at = True, reason, at

    def add(self, task: Task, now: float) -> None:
        if not self.tasks:
            self.start_time = now
        self.tasks.append(task)
        self.size += task.size
        task.batch = self


class BatchQueue:
    """A queue of batches for one (model, version, signature), as TF Serving's BasicBatchScheduler.

    Parameters and behaviour
    ------------------------
    - ``schedule(task)`` returns at once. A task larger than ``max_batch_size`` raises
      InvalidArgument; a task that needs a new batch when ``max_enqueued_batches`` batches
      are already waiting raises Unavailable (HTTP 503), with TF Serving's messages.
    - The newest batch is open. It closes when a task would overflow it, when it reaches
      ``max_batch_size`` rows, or when its first task has waited ``batch_timeout_micros``.
    - ``next_batch(now, idle)`` hands out the oldest batch that is closed or timed out.
      With ``idle`` (the worker has nothing in flight) an open batch is handed out at
      once, so a lone request never waits for company; batches form from what arrives
      while the worker is busy. A suspect batch (``requeue_suspect``) only goes to an idle
      worker.
    - Queueing latency, with a free worker, is at most ``batch_timeout_micros``.
    - ``batching=False`` gives every task a batch of its own (``--enable_batching=false``).

    Tuning
    ------
    ``max_batch_size`` bounds device memory per batch and the time one batch holds the
    worker; ``batch_timeout_micros`` trades a little latency under load for fuller batches.
    Raise ``max_enqueued_batches`` only as far as the queue can drain within the request
    deadline: beyond that, a fast 503 serves callers better than a late 504.
    """

    def __init__(self, params: BatchingParameters, *, batching: bool = True) -> None:
        self.params = params
        self.batching = batching
        self._timeout_s = params.batch_timeout_micros / 1e6
        self._batches: deque[Batch] = deque()

    def schedule(self, task: Task, now: float) -> None:
        """Queue a task; a task larger than ``max_batch_size`` (one InFlight could not split)
        runs in a batch of its own, as without batching."""
        max_size = self.params.max_batch_size
        open_batch = self._open_batch()
        if open_batch is None or open_batch.size + task.size > max_size or not self.batching or task.size > max_size:
            if open_batch is not None:  # it cannot take this task: closed now, unless its time was up already
                if now - open_batch.start_time >= self._timeout_s:
                    open_batch.close("timeout", open_batch.start_time + self._timeout_s)
                else:
                    open_batch.close("full", now)
            if len(self._batches) >= self.params.max_enqueued_batches:
                raise Unavailable("The batch scheduling queue to which this task was submitted is full")
            open_batch = Batch()
            self._batches.append(open_batch)
        open_batch.add(task, now)
        if open_batch.size >= max_size or not self.batching:
            open_batch.close("full" if self.batching else "unbatched", now)

    def next_batch(self, now: float, *, idle: bool) -> Batch | None:
        """The oldest batch ready to run, removed from the queue, or None."""
        if not self._batches:
            return None
        batch = self._batches[0]
        timed_out = now - batch.start_time >= self._timeout_s
        if not idle and (batch.suspect or (not batch.closed and not timed_out)):
            return None
        if not batch.closed:
            if timed_out:
                batch.close("timeout", min(now, batch.start_time + self._timeout_s))
            else:
                batch.close("idle", now)
        return self._batches.popleft()

    def requeue(self, tasks: list[Task]) -> list[Task]:
        """Put tasks that were handed out back at the front, as one closed batch, whatever
        ``max_enqueued_batches`` says (they were admitted already). Each task goes back
        once: returns those it put back, not the ones requeued before."""
        again = [t for t in tasks if not t.requeued]
        if again:
            batch = Batch()
            for task in again:
                batch.add(task, 0.0)
                task.requeued = True
            batch.close("retry", 0.0)
            self._batches.appendleft(batch)
        return again

    def requeue_suspect(self, tasks: list[Task]) -> None:
        """Put the tasks of a batch a worker died running back at the front as one suspect
        batch (see Batch.suspect), whatever ``max_enqueued_batches`` says."""
        batch = Batch(suspect=True, closed=True, exit_reason="retry")
        for task in tasks:
            batch.add(task, 0.0)
        self._batches.appendleft(batch)

    def next_deadline(self) -> float | None:
        """When the open batch times out, if the queue holds only an open batch."""
        if not self._batches:
            return None
        batch = self._batches[0]
        return None if batch.closed else batch.start_time + self._timeout_s

    def drain(self) -> Iterator[Task]:
        """Remove and yield every queued task (to fail them when their version goes away)."""
        while self._batches:
            yield from self._batches.popleft().tasks

    def expire(self, now: float) -> list[Task]:
        """Remove and return queued tasks whose deadline has passed."""
        expired: list[Task] = []
        for batch in self._batches:
            if any(t.deadline <= now for t in batch.tasks):
                keep = [t for t in batch.tasks if t.deadline > now]
                expired.extend(t for t in batch.tasks if t.deadline <= now)
                batch.tasks = keep
                batch.size = sum(t.size for t in keep)
        self._batches = deque(b for b in self._batches if b.tasks)
        return expired

    def remove(self, task: Task) -> bool:
        """Take a queued task out (its client cancelled it); False if it is not queued here."""
        batch = task.batch
        if batch is None or batch not in self._batches:
            return False
        batch.tasks.remove(task)
        batch.size -= task.size
        task.batch = None
        if not batch.tasks:
            self._batches.remove(batch)
        return True

    def __len__(self) -> int:
        """Tasks waiting."""
        return sum(len(b.tasks) for b in self._batches)

    @property
    def enqueued_batches(self) -> int:
        return len(self._batches)

    # --- implementation ---

    def _open_batch(self) -> Batch | None:
        if self._batches and not self._batches[-1].closed:
            return self._batches[-1]
        return None
