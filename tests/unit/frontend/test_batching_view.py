"""The status page's breakdown of a version's time and its batching advice, from the broker's counters."""

from __future__ import annotations

from typing import Any

from frontend.batching_view import MIN_BATCHES_FOR_ADVICE, breakdown
from tfbroker.wire.figures import QUEUE_LATENCY_BOUNDS_US, STAGE_BOUNDS_US, STAGES, VersionStats


def stats(*, batches: int, rows: int, exits: dict[str, int], queue_us: float, model_us: float, fill_us: float = 0.0,
          padded: dict[int, dict[int, int]] | None = None, max_batch_size: int = 32) -> VersionStats:
    """``batches`` batches of ``rows`` rows in all (a request a row), each request waiting
    ``queue_us`` in the queue (``fill_us`` of it for its batch to close) and each batch
    ``model_us`` in the model (input and output 50 µs each, transport 100)."""
    def counts(bounds: tuple[int, ...], value: float, n: int) -> list[int]:
        out = [0] * (len(bounds) + 1)
        out[next((i for i, b in enumerate(bounds) if value <= b), len(bounds))] = n
        return out

    stage_us = {"input": 50.0, "model": model_us, "output": 50.0, "transport": 100.0}
    return VersionStats(
        model="m", version=1, state="AVAILABLE", queued=0, in_flight=0, batches=batches, rows=rows, rejected=0,
        batch_sizes={rows // max(batches, 1): batches}, padded_sizes=padded or {rows // max(batches, 1): {0: batches}},
        exits=exits,
        queue_latency_buckets=counts(QUEUE_LATENCY_BOUNDS_US, queue_us, rows), queue_latency_sum_us=queue_us * rows,
        load_attempts={}, load_latency_s=0.0, restarts=0, fill_buckets=counts(QUEUE_LATENCY_BOUNDS_US, fill_us, rows),
        fill_sum_us=fill_us * rows,
        stage_buckets={s: counts(STAGE_BOUNDS_US, stage_us[s], batches) for s in STAGES},
        stage_sums_us={s: stage_us[s] * batches for s in STAGES}, max_batch_size=max_batch_size,
        batch_timeout_micros=5000)


def test_the_stages_add_up_to_an_average_request() -> None:
    view: dict[str, Any] = breakdown(stats(batches=100, rows=400, exits={"full": 100}, queue_us=2000, fill_us=500,
                                           model_us=3000))
    assert view["stages"]["fill"]["mean_ms"] == 0.5 and view["stages"]["wait"]["mean_ms"] == 1.5
    assert view["stages"]["model"]["mean_ms"] == 3.0
    assert view["stages"]["input"]["mean_ms"] == 0.05 and view["stages"]["output"]["mean_ms"] == 0.05
    assert view["stages"]["transport"]["mean_ms"] == 0.1
    assert view["stages"]["fill"]["p99_ms"] >= 0.5 and view["stages"]["model"]["p99_ms"] >= 3.0
    assert view["mean_rows"] == 4 and view["fill"] == 0.125 and view["exits"] == {"full": 100}


def test_half_empty_batches_on_the_timeout_say_lower_the_timeout() -> None:
    view = breakdown(stats(batches=100, rows=300, exits={"timeout": 90, "idle": 10}, queue_us=5000, fill_us=5000,
                           model_us=500))
    assert "lower batch_timeout_micros (now 5000)" in view["advice"]


def test_full_batches_behind_a_long_queue_say_raise_max_batch_size() -> None:
    view = breakdown(stats(batches=100, rows=3200, exits={"full": 100}, queue_us=20_000, model_us=4000))
    assert "raise max_batch_size, or add a replica" in view["advice"]


def test_no_advice_for_a_healthy_version_or_too_few_batches() -> None:
    assert breakdown(stats(batches=100, rows=3200, exits={"full": 100}, queue_us=1000, model_us=4000))["advice"] == ""
    few = MIN_BATCHES_FOR_ADVICE - 1
    assert breakdown(stats(batches=few, rows=few, exits={"timeout": few}, queue_us=5000, model_us=500))["advice"] == ""
    assert breakdown(stats(batches=0, rows=0, exits={}, queue_us=0, model_us=0)) == {}


def test_padding_is_a_share_of_the_rows_run() -> None:
    view = breakdown(stats(batches=100, rows=500, exits={"full": 100}, queue_us=100, model_us=4000,
                           padded={8: {3: 100}}))  # 5 rows padded to 8 in every batch
    assert view["padding_share"] == 0.375 and "allowed_batch_sizes" in view["advice"]
