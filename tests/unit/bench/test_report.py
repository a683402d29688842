"""The benchmark's ratios and table, on figures made up for the test (no servers run here)."""

from __future__ import annotations

from typing import Any

import pytest

from bench import report


def cell(server: str, instances: int, concurrency: int, requests: int) -> dict[str, Any]:
    return {"server": server, "instances": instances, "concurrency": concurrency, "requests": requests,
            "duration_s": 2.0, "errors": 0, "p50_ms": 1.0, "p99_ms": 2.0, "pss_mb": 100.0, "load_cpu_s": 0.1,
            "cpu_ms_per_request": {"frontends": 0.2, "broker": 0.1, "worker": 0.3}, "mean_batch_rows": 8.0,
            "host_busy": 0.564}


RESULTS = {
    "inprocess": [{"batch_size": 1, "samples_per_s": 1000.0, "latency_p50_ms": 1.0, "cpu_ms_per_sample": 1.0},
                  {"batch_size": 32, "samples_per_s": 20000.0, "latency_p50_ms": 1.6, "cpu_ms_per_sample": 0.1},
                  {"batch_size": 64, "samples_per_s": 32000.0, "latency_p50_ms": 2.0, "cpu_ms_per_sample": 0.06}],
    "cells": [cell("naive-2", 1, 64, 2000), cell("tfbroker-2", 1, 64, 8000), cell("tfbroker-2", 32, 1, 1000)],
    "memory": [{"server": "naive-2", "pss_mb": 800.0}, {"server": "tfbroker-2", "pss_mb": 600.0}],
    "duration_s": 2.0, "repeat": 3, "cpus": 2,
}


def test_ratios_against_naive_and_in_process() -> None:
    cells = {(c["server"], c["instances"]): c for c in report.enrich(RESULTS)}
    broker = cells[("tfbroker-2", 1)]
    assert broker["rps"] == 4000.0
    assert broker["x_naive2"] == pytest.approx(4.0)
    assert broker["x_inprocess"] == pytest.approx(4000.0 / 32000.0)  # one instance, c=64: batch 64
    assert cells[("tfbroker-2", 32)]["x_inprocess"] == pytest.approx(16000.0 / 20000.0)  # batch 32
    assert cells[("tfbroker-2", 32)]["x_naive2"] is None  # naive-2 has no such cell here


def test_markdown_table_has_every_cell_and_the_memory() -> None:
    table = report.markdown(RESULTS)
    assert "median of 3 run(s)" in table
    assert "| tfbroker-2 | 1 | 64 | 4000 | 4000 |" in table
    assert "| naive-2 | 800 |" in table
    assert "| 0.050 | 56 | 8.0 |" in table  # load generator CPU per request, host busy %, mean batch


def test_host_busy_is_read_from_proc_stat_and_moves_with_work() -> None:
    from bench.servers import host_cpu_ticks

    busy0, total0 = host_cpu_ticks()
    sum(i * i for i in range(2_000_000))  # about 0.1 s of one CPU
    busy1, total1 = host_cpu_ticks()
    assert 0 <= busy0 <= total0 and total1 > total0 and busy1 > busy0


def test_every_role_measured_is_in_the_table_peers_included() -> None:
    peers = {**RESULTS, "cells": [{**cell("litserve", 1, 64, 1000), "cpu_ms_per_request": {"litserve": 1.3, "workers": 0.46}},
                                  {**cell("rayserve", 1, 64, 600), "cpu_ms_per_request": {"ray": 5.95}}]}
    table = report.markdown(peers)
    assert "litserve 1.300" in table and "workers 0.460" in table and "ray 5.950" in table
