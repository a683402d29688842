"""Where a version's requests spend their time, and one sentence of advice on its batching.

From the broker's counters (broker/stats.py, sent as VersionStats): per request, its queue
wait split into the wait for its batch to close (fill) and then for a worker (wait); then per
batch its inputs assembled, the model's own calls, its outputs cut, and the
transport (figures.STAGES); how
full the batches leave, how much padding they carry and why they leave. The status page shows
it as a stacked bar (an average request and a p99 one, each stage at its own mean or p99:
the p99 bar is an upper bound, since the slowest of each stage need not meet in one request).
"""

from __future__ import annotations

from typing import Any, Sequence

from tfbroker.wire.figures import QUEUE_LATENCY_BOUNDS_US, STAGE_BOUNDS_US, STAGES, VersionStats

# Advice needs this many batches behind it: a handful says nothing about a setting.
MIN_BATCHES_FOR_ADVICE = 50


def breakdown(v: VersionStats) -> dict[str, Any]:
    """The page's figures for one version (times in ms); empty before its first batch."""
    if not v.batches:
        return {}
    requests = sum(v.queue_latency_buckets)
    fill = _stage(QUEUE_LATENCY_BOUNDS_US, v.fill_buckets, v.fill_sum_us, requests)
    queue = _stage(QUEUE_LATENCY_BOUNDS_US, v.queue_latency_buckets, v.queue_latency_sum_us, requests)
    # The queue wait split: until the batch closed (fill), then for a worker to take it (wait).
    stages = {"fill": fill, "wait": {"mean_ms": round(max(0.0, queue["mean_ms"] - fill["mean_ms"]), 3),
                                     "p99_ms": round(max(0.0, queue["p99_ms"] - fill["p99_ms"]), 3)}}
    for stage in STAGES:
        counts = v.stage_buckets.get(stage, [])
        stages[stage] = _stage(STAGE_BOUNDS_US, counts, v.stage_sums_us.get(stage, 0.0), sum(counts))
    padded = sum(size * n for size, paddings in v.padded_sizes.items() for n in paddings.values())
    padding = sum(pad * n for paddings in v.padded_sizes.values() for pad, n in paddings.items())
    mean_rows = v.rows / v.batches
    view = {"stages": stages, "batches": v.batches, "mean_rows": round(mean_rows, 2),
            "fill": round(mean_rows / v.max_batch_size, 3) if v.max_batch_size else None,
            "padding_share": round(padding / padded, 3) if padded else 0.0, "exits": dict(sorted(v.exits.items()))}
    view["advice"] = advice(view, v.batch_timeout_micros)
    return view


def advice(view: dict[str, Any], batch_timeout_micros: int) -> str:
    """One sentence when the numbers say it, else empty."""
    batches, exits, fill = view["batches"], view["exits"], view["fill"]
    if batches < MIN_BATCHES_FOR_ADVICE or fill is None:
        return ""
    stages = view["stages"]
    if exits.get("timeout", 0) > batches / 2 and fill < 0.5:
        return (f"Most batches leave on the timeout less than half full: lower batch_timeout_micros (now "
                f"{batch_timeout_micros}); each waits that long for requests that do not come.")
    if exits.get("full", 0) > batches / 2 and stages["wait"]["mean_ms"] > stages["model"]["mean_ms"]:
        return ("Batches leave full and requests wait in the queue longer than the model runs: raise "
                "max_batch_size, or add a replica (--devices).")
    if view["padding_share"] > 0.25:
        return ("More than a quarter of the rows run are padding: add allowed_batch_sizes nearer the sizes "
                "that form.")
    return ""


def _stage(bounds: Sequence[int], counts: Sequence[int], sum_us: float, total: int) -> dict[str, float]:
    return {"mean_ms": round(sum_us / total / 1000, 3) if total else 0.0,
            "p99_ms": round(_quantile(bounds, counts, total, 0.99) / 1000, 3)}


def _quantile(bounds: Sequence[int], counts: Sequence[int], total: int, q: float) -> float:
    """The bucket bound where the quantile falls (µs); past the last bound, the last bound."""
    if not total or not counts:
        return 0.0
    running = 0
    for bound, count in zip(bounds, counts):
        running += count
        if running >= q * total:
            return float(bound)
    return float(bounds[-1])
