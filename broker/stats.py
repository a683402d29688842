"""What the broker counts for the metrics: per version batches, rows, rejections, batch sizes
and queueing latency; model loads; the CPU and memory of its processes by role."""

from __future__ import annotations

import bisect
import os
from dataclasses import dataclass, field
from pathlib import Path

from tfbroker.wire import protocol
from tfbroker.wire.protocol import QUEUE_LATENCY_BOUNDS_US

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


@dataclass(slots=True)
class VersionCounters:
    batches: int = 0
    rows: int = 0
    rejected: int = 0  # 503: its queue was full
    batch_sizes: dict[int, int] = field(default_factory=dict)
    queue_latency_buckets: list[int] = field(default_factory=lambda: [0] * (len(QUEUE_LATENCY_BOUNDS_US) + 1))
    queue_latency_sum_us: float = 0.0
    load_attempts: dict[str, int] = field(default_factory=dict)
    load_latency_s: float = 0.0

    def record_batch(self, rows: int, waits_s: list[float]) -> None:
        self.batches += 1
        self.rows += rows
        self.batch_sizes[rows] = self.batch_sizes.get(rows, 0) + 1
        for wait_s in waits_s:
            wait_us = wait_s * 1e6
            self.queue_latency_buckets[bisect.bisect_left(QUEUE_LATENCY_BOUNDS_US, wait_us)] += 1
            self.queue_latency_sum_us += wait_us

    def record_load(self, outcome: str, seconds: float = 0.0) -> None:
        self.load_attempts[outcome] = self.load_attempts.get(outcome, 0) + 1
        if seconds:
            self.load_latency_s = seconds


def process_stats(pids_by_role: dict[str, list[int]]) -> list[protocol.ProcessStats]:
    """CPU seconds and resident memory of each role's live processes, from /proc."""
    stats = []
    for role, pids in pids_by_role.items():
        cpu_s, rss, alive = 0.0, 0, 0
        for pid in pids:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                resident = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
            except (OSError, IndexError, ValueError):
                continue
            cpu_s += (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
            rss += resident * _PAGE_BYTES
            alive += 1
        stats.append(protocol.ProcessStats(role, alive, round(cpu_s, 3), rss))
    return stats


def children_of(pid: int) -> list[int]:
    """Direct children of ``pid`` (the frontends under the broker's gunicorn master)."""
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []
