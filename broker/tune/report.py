"""The tuner's results: one row per setting and concurrency, the best setting for a p99
target, and how they are shown (a table, JSON, a plot)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from broker.tune.load import LevelResult
from broker.tune.settings import Setting


@dataclass
class Measured:
    setting: Setting
    levels: list[LevelResult] = field(default_factory=list)


@dataclass(frozen=True)
class Choice:
    setting: Setting
    level: LevelResult
    meets_target: bool  # its p99 is within --p99_ms (always, without a target)


def usable(level: LevelResult, p99_ms: float | None) -> bool:
    return level.errors == 0 and level.requests > 0 and (p99_ms is None or level.p99_ms <= p99_ms)


def best(measured: list[Measured], p99_ms: float | None) -> Choice | None:
    """The setting and load with the most requests a second whose p99 meets the target (and
    no errors); without one that does, the lowest p99 seen, marked as missing the target."""
    points = [(m.setting, level) for m in measured for level in m.levels]
    meeting = [(s, lv) for s, lv in points if usable(lv, p99_ms)]
    if meeting:
        setting, level = max(meeting, key=lambda p: p[1].rps)
        return Choice(setting, level, True)
    clean = [(s, lv) for s, lv in points if lv.errors == 0 and lv.requests > 0]
    if not clean:
        return None
    setting, level = min(clean, key=lambda p: p[1].p99_ms)
    return Choice(setting, level, False)


def as_json(model: str, measured: list[Measured], choice: Choice | None, p99_ms: float | None,
            verified: LevelResult | None, elapsed_s: float) -> dict[str, Any]:
    return {
        "model": model, "p99_ms_target": p99_ms, "elapsed_s": round(elapsed_s, 1),
        "settings": [{**m.setting.as_dict(), "levels": [_level(lv) for lv in m.levels]} for m in measured],
        "recommendation": None if choice is None else {
            **choice.setting.as_dict(), "concurrency": choice.level.concurrency, "rps": round(choice.level.rps, 1),
            "p50_ms": _ms(choice.level.p50_ms), "p99_ms": _ms(choice.level.p99_ms), "meets_target": choice.meets_target,
            "batching_parameters": choice.setting.batching_parameters(), "flags": choice.setting.flags()},
        "verified": None if verified is None else {
            **_level(verified), "rps_ratio": round(verified.rps / choice.level.rps, 3) if choice else None},
    }


def table(measured: list[Measured], choice: Choice | None) -> Any:
    from rich.table import Table

    grid = Table(title="tfbroker.tune: requests a second and latency per setting and load")
    for name in ("max_batch_size", "timeout µs", "TF threads", "in flight", "frontends", "concurrency", "req/s",
                 "p50 ms", "p99 ms", "errors"):
        grid.add_column(name, justify="right")
    for m in measured:
        for level in m.levels:
            chosen = choice is not None and choice.setting == m.setting and choice.level is level
            s = m.setting
            grid.add_row(str(s.max_batch_size), str(s.batch_timeout_micros),
                         f"{s.intra_op_threads}/{s.inter_op_threads}", str(s.batches_in_flight),
                         str(s.frontends), str(level.concurrency), f"{level.rps:,.0f}", f"{level.p50_ms:.2f}",
                         f"{level.p99_ms:.2f}", str(level.errors), style="bold green" if chosen else None)
        grid.add_section()
    return grid


def plot(measured: list[Measured], path: str) -> None:
    """p99 against requests a second, one line per setting (matplotlib, if installed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SystemExit(f"--plot needs matplotlib: pip install matplotlib ({exc})") from exc
    figure, axes = plt.subplots(figsize=(9, 6))
    for m in measured:
        points = [(lv.rps, lv.p99_ms) for lv in m.levels if lv.requests]
        if points:
            axes.plot(*zip(*points), marker="o", label=m.setting.label())
    axes.set_xlabel("requests a second")
    axes.set_ylabel("p99 latency (ms)")
    axes.set_yscale("log")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _level(level: LevelResult) -> dict[str, Any]:
    values = asdict(level)
    values.update(rps=round(level.rps, 1), p50_ms=_ms(level.p50_ms), p99_ms=_ms(level.p99_ms))
    return values


def _ms(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 3)
