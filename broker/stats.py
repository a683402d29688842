"""What the broker counts for the metrics: per version batches, rows, rejections, batch sizes
(formed, as requests came, as processed after padding), why batches left the queue, and
queueing latency; model loads; the CPU and memory of its processes by role."""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field

import psutil

from tfbroker.wire import protocol
from tfbroker.wire.figures import QUEUE_LATENCY_BOUNDS_US, STAGE_BOUNDS_US, STAGES, ProcessStats


@dataclass(slots=True)
class VersionCounters:
    batches: int = 0
    rows: int = 0
    rejected: int = 0  # 503: its queue was full
    batch_sizes: dict[int, int] = field(default_factory=dict)
    input_sizes: dict[int, int] = field(default_factory=dict)  # requests by rows (TF Serving's input_batch_size)
    padded_sizes: dict[int, dict[int, int]] = field(default_factory=dict)  # processed size -> padding -> batches
    exits: dict[str, int] = field(default_factory=dict)  # batches by why they left the queue (Batch.exit)
    queue_latency_buckets: list[int] = field(default_factory=lambda: [0] * (len(QUEUE_LATENCY_BOUNDS_US) + 1))
    queue_latency_sum_us: float = 0.0
    # Each request's part of that wait until its batch stopped taking requests (full, timed out, or
    # taken by an idle worker); the rest of the queue wait is for a worker to take it.
    fill_buckets: list[int] = field(default_factory=lambda: [0] * (len(QUEUE_LATENCY_BOUNDS_US) + 1))
    fill_sum_us: float = 0.0
    load_attempts: dict[str, int] = field(default_factory=dict)
    load_latency_s: float = 0.0
    # Each batch's time by stage (STAGES): buckets by STAGE_BOUNDS_US and the sum, microseconds.
    stage_buckets: dict[str, list[int]] = field(
        default_factory=lambda: {stage: [0] * (len(STAGE_BOUNDS_US) + 1) for stage in STAGES})
    stage_sums_us: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    request_stage_us: float = 0.0  # each request's share: its batch's round trip, summed over requests
    size_stats: dict[int, list[float]] = field(default_factory=dict)  # processed rows -> [batches, in, model, out µs]
    last_batch_ms: int = 0  # when the last batch was sent, ms since the epoch (OIP's last_inference)

    def record_stages(self, result: protocol.TaskResult | protocol.JoinedResult, round_trip_s: float, rows: int,
                      requests: int) -> None:
        """One batch's time after the queue: the worker's three stages (its report), and the
        rest of the round trip from the broker (the way there and back, and the wait behind
        the batch before it)."""
        worker_us = result.input_us + result.model_us + result.output_us
        times = {"input": result.input_us, "model": result.model_us, "output": result.output_us,
                 "transport": max(0.0, round_trip_s * 1e6 - worker_us)}
        for stage, micros in times.items():
            self.stage_buckets[stage][bisect.bisect_left(STAGE_BOUNDS_US, micros)] += 1
            self.stage_sums_us[stage] += micros
        self.request_stage_us += round_trip_s * 1e6 * requests
        by_size = self.size_stats.setdefault(rows, [0, 0.0, 0.0, 0.0])
        by_size[0] += 1
        by_size[1] += result.input_us
        by_size[2] += result.model_us
        by_size[3] += result.output_us

    def record_batch(self, rows: int, padded_rows: int, exit_reason: str, task_rows: list[int],
                     waits_s: list[float], fills_s: list[float]) -> None:
        self.last_batch_ms = int(time.time() * 1000)
        self.batches += 1
        self.rows += rows
        self.batch_sizes[rows] = self.batch_sizes.get(rows, 0) + 1
        padding = self.padded_sizes.setdefault(padded_rows, {})
        padding[padded_rows - rows] = padding.get(padded_rows - rows, 0) + 1
        self.exits[exit_reason] = self.exits.get(exit_reason, 0) + 1
        for size in task_rows:
            self.input_sizes[size] = self.input_sizes.get(size, 0) + 1
        for wait_s in waits_s:
            wait_us = wait_s * 1e6
            self.queue_latency_buckets[bisect.bisect_left(QUEUE_LATENCY_BOUNDS_US, wait_us)] += 1
            self.queue_latency_sum_us += wait_us
        for fill_s in fills_s:
            fill_us = fill_s * 1e6
            self.fill_buckets[bisect.bisect_left(QUEUE_LATENCY_BOUNDS_US, fill_us)] += 1
            self.fill_sum_us += fill_us

    def record_load(self, outcome: str, seconds: float = 0.0) -> None:
        self.load_attempts[outcome] = self.load_attempts.get(outcome, 0) + 1
        if seconds:
            self.load_latency_s = seconds


def process_stats(pids_by_role: dict[str, list[int]]) -> list[ProcessStats]:
    """CPU seconds and resident memory of each role's live processes."""
    stats = []
    for role, pids in pids_by_role.items():
        cpu_s, rss, alive = 0.0, 0, 0
        for pid in pids:
            try:
                process = psutil.Process(pid)
                with process.oneshot():
                    times, resident = process.cpu_times(), process.memory_info().rss
            except psutil.Error:
                continue  # gone since it was listed
            cpu_s += times.user + times.system
            rss += resident
            alive += 1
        stats.append(ProcessStats(role, alive, round(cpu_s, 3), rss))
    return stats


def children_of(pid: int) -> list[int]:
    """Direct children of ``pid`` (the frontends under the broker's gunicorn master)."""
    try:
        return [child.pid for child in psutil.Process(pid).children()]
    except psutil.Error:
        return []
