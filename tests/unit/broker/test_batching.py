"""BatchQueue against TF Serving's BasicBatchScheduler semantics, without processes."""

from __future__ import annotations

import pytest

from broker.batching import BatchQueue, Task
from broker.config import BatchingParameters
from tfbroker.wire.errors import Unavailable


def queue(**params: object) -> BatchQueue:
    return BatchQueue(BatchingParameters(**params))  # type: ignore[arg-type]


def task(size: int = 1, deadline: float = 100.0) -> Task:
    return Task(size, deadline)


def test_a_busy_worker_waits_for_a_full_batch_or_the_timeout() -> None:
    q = queue(max_batch_size=4, batch_timeout_micros=10_000)
    q.schedule(task(), now=0.0)
    q.schedule(task(2), now=0.001)
    assert q.next_batch(0.005, idle=False) is None
    assert q.next_deadline() == pytest.approx(0.010)
    batch = q.next_batch(0.010, idle=False)
    assert batch is not None and batch.size == 3 and len(batch.tasks) == 2


def test_an_idle_worker_takes_the_open_batch_at_once() -> None:
    q = queue(max_batch_size=4, batch_timeout_micros=1_000_000)
    q.schedule(task(), now=0.0)
    batch = q.next_batch(0.0, idle=True)
    assert batch is not None and batch.size == 1 and batch.closed


def test_a_full_batch_closes_and_rows_never_exceed_max_batch_size() -> None:
    q = queue(max_batch_size=4, batch_timeout_micros=1_000_000)
    for size in (3, 2, 1, 4):
        q.schedule(task(size), now=0.0)
    sizes = []
    while (batch := q.next_batch(0.0, idle=False)) is not None:
        sizes.append(batch.size)
    assert sizes == [3, 3, 4]  # the 2 did not fit beside the 3; the 4 fills a batch alone
    assert len(q) == 0


def test_a_task_larger_than_max_batch_size_runs_in_a_batch_of_its_own() -> None:
    q = queue(max_batch_size=4, batch_timeout_micros=1_000_000)
    q.schedule(task(1), now=0.0)
    q.schedule(task(5), now=0.0)  # one InFlight could not split (string inputs): alone, not refused
    q.schedule(task(1), now=0.0)
    sizes = []
    while (batch := q.next_batch(0.0, idle=True)) is not None:
        sizes.append(batch.size)
    assert sizes == [1, 5, 1]


def test_overflow_beyond_max_enqueued_batches_is_unavailable() -> None:
    q = queue(max_batch_size=2, max_enqueued_batches=2, batch_timeout_micros=1_000_000)
    for _ in range(4):
        q.schedule(task(), now=0.0)
    with pytest.raises(Unavailable, match="The batch scheduling queue to which this task was submitted is full"):
        q.schedule(task(), now=0.0)
    assert q.enqueued_batches == 2


def test_without_batching_every_task_runs_alone() -> None:
    q = BatchQueue(BatchingParameters(max_batch_size=8), batching=False)
    for _ in range(3):
        q.schedule(task(2), now=0.0)
    batches = [q.next_batch(0.0, idle=False) for _ in range(3)]
    assert [b.size if b else None for b in batches] == [2, 2, 2]


def test_expired_tasks_leave_the_queue() -> None:
    q = queue(max_batch_size=4, batch_timeout_micros=1_000_000)
    q.schedule(task(deadline=1.0), now=0.0)
    q.schedule(task(deadline=5.0), now=0.0)
    expired = q.expire(2.0)
    assert [t.deadline for t in expired] == [1.0]
    assert len(q) == 1
    assert [t.deadline for t in q.drain()] == [5.0]


@pytest.mark.parametrize(("params", "message"), [
    ({"max_batch_size": 0}, "max_batch_size must be >= 1"),
    ({"batch_timeout_micros": -1}, "batch_timeout_micros"),
    ({"max_enqueued_batches": 0}, "max_enqueued_batches"),
    ({"max_batch_size": 8, "allowed_batch_sizes": (2, 4)}, "must end with max_batch_size"),
    ({"max_batch_size": 8, "allowed_batch_sizes": (4, 2, 8)}, "increasing"),
])
def test_invalid_parameters_name_the_field(params: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BatchingParameters(**params)  # type: ignore[arg-type]


def test_padding_to_allowed_sizes() -> None:
    params = BatchingParameters(max_batch_size=8, allowed_batch_sizes=(2, 4, 8))
    assert [params.padded_size(n) for n in (1, 2, 3, 5, 8)] == [2, 2, 4, 8, 8]
    assert BatchingParameters().padded_size(5) == 5


def test_a_cancelled_task_leaves_its_batch_and_an_emptied_batch_leaves_the_queue() -> None:
    queue = BatchQueue(BatchingParameters(max_batch_size=4, batch_timeout_micros=1000))
    first, second = Task(1, 10.0, "a"), Task(2, 10.0, "b")
    queue.schedule(first, 0.0)
    queue.schedule(second, 0.0)
    assert queue.remove(first) and len(queue) == 1
    assert not queue.remove(first), "only once"
    batch = queue.next_batch(0.0, idle=True)
    assert batch is not None and [t.payload for t in batch.tasks] == ["b"] and batch.size == 2
    assert not queue.remove(second), "a dispatched task is not in the queue"
    lone = Task(1, 10.0, "c")
    queue.schedule(lone, 0.0)
    assert queue.remove(lone) and queue.enqueued_batches == 0


def test_requeued_tasks_run_next_even_on_a_full_queue_and_only_once() -> None:
    q = queue(max_batch_size=4, max_enqueued_batches=1)
    first = [task(), task(2)]
    for t in first:
        q.schedule(t, now=0.0)
    handed_out = q.next_batch(0.0, idle=True)
    assert handed_out is not None
    q.schedule(task(3), now=0.1)  # the queue is full again
    assert q.requeue(handed_out.tasks) == first  # their worker died: they go back, at the front
    again = q.next_batch(0.2, idle=False)
    assert again is not None and again.tasks == first and again.size == 3
    assert q.requeue(again.tasks) == []  # a second worker died with them: not again
    assert len(q) == 1


def test_each_batch_says_why_it_left_the_queue() -> None:
    q = queue(max_batch_size=4, batch_timeout_micros=10_000)
    q.schedule(task(4), now=0.0)  # full at once
    q.schedule(task(3), now=0.0)
    q.schedule(task(2), now=0.0)  # did not fit: the batch of 3 closed full
    q.schedule(task(1), now=0.0)
    reasons = [q.next_batch(0.001, idle=False) for _ in range(2)]
    assert [b.exit_reason for b in reasons if b is not None] == ["full", "full"]
    assert q.next_batch(0.001, idle=False) is None  # the open batch of 3 rows waits
    timed_out = q.next_batch(0.010, idle=False)
    assert timed_out is not None and timed_out.exit_reason == "timeout"
    q.schedule(task(), now=1.0)
    idle = q.next_batch(1.0, idle=True)
    assert idle is not None and idle.exit_reason == "idle"
    q.schedule(task(), now=2.0)
    taken = q.next_batch(2.0, idle=True)
    assert taken is not None
    assert q.requeue(taken.tasks)
    retried = q.next_batch(2.0, idle=False)
    assert retried is not None and retried.exit_reason == "retry"
    unbatched = BatchQueue(BatchingParameters(max_batch_size=4), batching=False)
    unbatched.schedule(task(), now=0.0)
    alone = unbatched.next_batch(0.0, idle=False)
    assert alone is not None and alone.exit_reason == "unbatched"


def test_a_batch_closes_when_full_when_it_times_out_or_when_an_idle_worker_takes_it() -> None:
    q = queue(max_batch_size=2, batch_timeout_micros=10_000)
    q.schedule(task(), now=0.0)
    q.schedule(task(), now=0.003)  # full: it closes now
    q.schedule(task(), now=0.004)
    full = q.next_batch(0.5, idle=False)
    assert full is not None and full.closed_at == 0.003
    timed_out = q.next_batch(0.5, idle=False)  # handed out late: its fill ended at the timeout
    assert timed_out is not None and timed_out.closed_at == pytest.approx(0.014)
    q.schedule(task(), now=1.0)
    idle = q.next_batch(1.002, idle=True)
    assert idle is not None and idle.closed_at == 1.002
