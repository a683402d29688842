"""The Open Inference Protocol's statistics extension (Triton's): each version's counts and
cumulative durations, from the broker's own counters (broker/stats.py, as VersionStats), for
``GET /v2/models[/M[/versions/V]]/stats`` and gRPC ``ModelStatistics`` alike, so
tritonclient's ``get_inference_statistics`` works.

How the broker's stages map to Triton's (durations in ns, counts as Triton counts them):

- ``inference_count``: rows batched; ``execution_count``: batches run;
- ``success``: requests batched, each with its queue wait and its batch's round trip;
- ``fail``: requests refused with 503 because the version's queue was full;
- ``queue``: each request's wait in the broker's batch queue;
- ``compute_input`` / ``compute_infer`` / ``compute_output``: per batch, the worker's input
  assembly, the model's own calls, the outputs cut and encoded;
- ``batch_stats``: the same three per processed (padded) batch size.
"""

from __future__ import annotations

from typing import Any

from tfbroker.wire import protocol
from tfbroker.wire.errors import NotFound
from tfbroker.wire.figures import VersionStats


def model_statistics(stats: protocol.StatsReply, model: str = "", version: int | None = None,
                     label: str | None = None) -> list[dict[str, Any]]:
    """Triton's ``model_stats`` for every version, one model's, or one version's (by number or
    label); NotFound for a model or version the broker does not have."""
    versions = [v for v in stats.versions if not model or v.model == model]
    if model and not versions and not any(m.get("name") == model for m in stats.status.get("models", [])):
        raise NotFound(f"Request for unknown model: '{model}' is not found")
    if label is not None:
        labels: dict[str, int] = next((m.get("labels", {}) for m in stats.status.get("models", [])
                                       if m.get("name") == model), {})
        if label not in labels:
            raise NotFound(f"Request for unknown model: '{model}' has no version labelled '{label}'")
        version = int(labels[label])
    if version is not None:
        versions = [v for v in versions if v.version == version]
        if not versions:
            raise NotFound(f"Request for unknown model: '{model}' version {version} is not found")
    return [_one(v) for v in sorted(versions, key=lambda v: (v.model, v.version))]


def _one(v: VersionStats) -> dict[str, Any]:
    requests = sum(v.queue_latency_buckets)
    sums = v.stage_sums_us
    return {
        "name": v.model, "version": str(v.version), "last_inference": v.last_batch_ms,
        "inference_count": v.rows, "execution_count": v.batches,
        "inference_stats": {
            "success": _duration(requests, v.queue_latency_sum_us + v.request_stage_us),
            "fail": _duration(v.rejected, 0.0),
            "queue": _duration(requests, v.queue_latency_sum_us),
            "compute_input": _duration(v.batches, sums.get("input", 0.0)),
            "compute_infer": _duration(v.batches, sums.get("model", 0.0)),
            "compute_output": _duration(v.batches, sums.get("output", 0.0)),
            "cache_hit": _duration(0, 0.0), "cache_miss": _duration(0, 0.0)},
        "batch_stats": [{"batch_size": size, "compute_input": _duration(int(n), input_us),
                         "compute_infer": _duration(int(n), model_us), "compute_output": _duration(int(n), output_us)}
                        for size, (n, input_us, model_us, output_us) in sorted(v.size_stats.items())],
    }


def _duration(count: int, micros: float) -> dict[str, int]:
    return {"count": count, "ns": round(micros * 1000)}
