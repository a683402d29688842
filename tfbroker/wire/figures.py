"""What the broker counts, as it travels in a StatsReply (tfbroker/wire/protocol.py): each
model version's counters and histograms (counted by broker/stats.py; shown by
frontend/metrics.py, the status page and the Open Inference Protocol's statistics), and its
processes' CPU and memory by role."""

from __future__ import annotations

import msgspec

from tfbroker.wire.fields import Name, Version


# A batch's stages after the queue, timed per version (VersionStats): in the worker, its inputs
# assembled, the model's own calls (TF Serving's runtime_latency) and its outputs cut; then the
# way to the worker and back (and the wait there behind the batch before it).
STAGES = ("input", "model", "output", "transport")
# Their histogram's bounds, microseconds: TF Serving's runtime_latency buckets (10 x 1.8^k, 33).
STAGE_BOUNDS_US = tuple(round(10 * 1.8 ** k) for k in range(33))

# Bounds of the queueing-latency histogram in VersionStats, microseconds (as TF Serving's).
QUEUE_LATENCY_BOUNDS_US = (100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000,
                           500_000, 1_000_000, 2_500_000, 5_000_000, 10_000_000)


class VersionStats(msgspec.Struct, kw_only=True):
    """One model version's counters and gauges, for the metrics (counted by broker/stats.py, served by frontend/metrics.py)."""

    model: Name
    version: Version
    state: str
    queued: int
    in_flight: int
    batches: int
    rows: int
    rejected: int
    batch_sizes: dict[int, int]  # formed batches by rows
    input_sizes: dict[int, int] = {}  # requests by rows
    padded_sizes: dict[int, dict[int, int]] = {}  # batches by processed (padded) rows, then by padding rows
    exits: dict[str, int] = {}  # batches by why they left the queue: full, timeout, idle, unbatched, retry
    queue_latency_buckets: list[int]  # tasks by wait, one count per bound of QUEUE_LATENCY_BOUNDS_US and over
    queue_latency_sum_us: float
    load_attempts: dict[str, int]  # by outcome: OK, or the error
    load_latency_s: float
    restarts: int
    stage_buckets: dict[str, list[int]] = {}  # batches by time in each of STAGES, per STAGE_BOUNDS_US and over
    stage_sums_us: dict[str, float] = {}
    fill_buckets: list[int] = []  # requests by their wait for their batch to close, per QUEUE_LATENCY_BOUNDS_US
    fill_sum_us: float = 0.0
    size_stats: dict[int, list[float]] = {}  # by processed batch size: [batches, input µs, model µs, output µs]
    request_stage_us: float = 0.0  # each request's share of its batch's stages, summed (a request's whole time)
    last_batch_ms: int = 0  # when its last batch was sent, ms since the epoch
    max_batch_size: int = 0  # the version's batching, for how full its batches leave
    batch_timeout_micros: int = 0


class ProcessStats(msgspec.Struct, array_like=True):
    role: str
    processes: int
    cpu_seconds: float
    rss_bytes: int
