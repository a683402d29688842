"""The benchmark run: model, in-process limit, then each server alone under the same load."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench import report
from bench.load import client_load, wrk
from bench.servers import (ROOT, Server, cpu_by_role, host_cpu_ticks, litserve_server, mosec_server, naive_server,
                           raw_asgi_server, rayserve_server, tfbroker_granian_server, tfbroker_nginx_server,
                           tfbroker_server, total_pss_mb)
from tfbroker import Client

SERVERS = ("naive-2", "naive-4", "mosec", "mosec-orjson", "litserve", "rayserve", "tfbroker-2", "tfbroker-4", "tfbroker-8",
           "tfbroker-granian-2", "tfbroker-rsgi-2", "tfbroker-nginx-2", "tfbroker-replicas-2", "client")
QUICK_SERVERS = ("naive-2", "mosec", "tfbroker-2", "client")
CONCURRENCY = (1, 16, 64, 256)
CLIENT_CONCURRENCY = (1, 16, 64, 256)
INSTANCES = (1, 32)
PORT = 18501


@dataclass(frozen=True)
class BenchConfig:
    out: str
    duration_s: float
    quick: bool
    servers: tuple[str, ...] = ()
    repeat: int = 1  # rounds over every server; per cell the run with the median requests/s is reported
    instances: tuple[int, ...] = (1, 32)
    short_numbers: bool = False  # bodies with 0.5-style numbers instead of float32 at full precision


def run(config: BenchConfig) -> int:
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="tfb-bench-"))
    try:
        model_base = work / "mlp"
        log(f"making the mlp model in {model_base}")
        _python("-c", f"from workers.demo_models import save_mlp; save_mlp({str(model_base / '1')!r})")
        probe = _make_probe(work)
        log("measuring the in-process limit")
        _python("-m", "bench.inprocess", str(model_base / "1"), str(work / "inprocess.json"),
                "--probe_in", str(work / "probe_in.npz"), "--probe_out", str(work / "probe_out.npz"))
        inprocess = json.loads((work / "inprocess.json").read_text())
        with np.load(work / "probe_in.npz") as xs, np.load(work / "probe_out.npz") as ys:
            np.savez(probe, **{k: xs[k] for k in xs.files}, **{"y" + k[1:]: ys[k] for k in ys.files})
        names = config.servers or (QUICK_SERVERS if config.quick else SERVERS)
        runs: list[dict[str, Any]] = []
        memory: dict[str, list[float]] = {}
        for round_ in range(config.repeat):  # interleaved: every server once per round
            for name in names:
                server = _server(name, str(model_base), work)
                log(f"round {round_ + 1}/{config.repeat}: starting {name}")
                server.start()
                try:
                    _check_answers(server, probe)
                    if name == "client":
                        runs += _client_series(server, probe, config)
                    else:
                        runs += _http_series(server, probe, config)
                    memory.setdefault(name, []).append(total_pss_mb(server.process.pid))  # type: ignore[union-attr]
                finally:
                    server.stop()
        cells = _medians(runs)
        results = {"inprocess": inprocess, "cells": cells,
                   "memory": [{"server": name, "pss_mb": sorted(v)[len(v) // 2]} for name, v in memory.items()],
                   "duration_s": config.duration_s, "repeat": config.repeat, "cpus": os.cpu_count()}
        (out / "results.json").write_text(json.dumps(results, indent=1))
        table = report.markdown(results)
        (out / "results.md").write_text(table)
        report.plots(results, out)
        print(table)
        log(f"results in {out}/: results.json, results.md, throughput.png, latency.png, memory.png")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _python(*args: str, timeout_s: float = 600) -> None:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, timeout=timeout_s)
    if result.returncode != 0:
        raise RuntimeError(result.stderr.decode(errors="replace")[-2000:])


def _make_probe(work: Path) -> Path:
    rng = np.random.default_rng(2)
    np.savez(work / "probe_in.npz", **{f"x{n}": rng.standard_normal((n, 256)).astype(np.float32) for n in INSTANCES})
    return work / "probe.npz"


def _server(name: str, model_base: str, work: Path) -> Server:
    kind, _, count = name.partition("-")
    runtime = tempfile.mkdtemp(prefix="tfb-", dir="/tmp")
    if kind == "naive":
        return naive_server(model_base + "/1", int(count), PORT)
    if name.startswith("raw-asgi-"):
        return raw_asgi_server(int(count.rsplit("-", 1)[1]), PORT)
    if name == "litserve":
        return litserve_server(model_base + "/1", PORT)
    if name == "rayserve":
        return rayserve_server(model_base + "/1", PORT)
    if kind == "mosec":
        return mosec_server(model_base + "/1", PORT, count or "default")
    if name.startswith(("tfbroker-granian-", "tfbroker-rsgi-")):
        interface = "rsgi" if "-rsgi-" in name else "asgi"
        return tfbroker_granian_server(model_base, int(name.rsplit("-", 1)[1]), PORT, runtime, interface)
    if name.startswith("tfbroker-nginx-"):
        return tfbroker_nginx_server(model_base, int(name.rsplit("-", 1)[1]), PORT, runtime)
    if name.startswith("tfbroker-replicas-"):  # two CPU replicas of the model (--devices=cpu,cpu)
        server = tfbroker_server(model_base, int(name.rsplit("-", 1)[1]), PORT, runtime, ["--devices=cpu,cpu"])
        server.name = name
        return server
    if kind == "tfbroker":
        return tfbroker_server(model_base, int(count), PORT, runtime)
    if kind == "client":  # the broker alone: the Python client is its only caller
        server = tfbroker_server(model_base, 1, PORT, runtime)
        server.name = "client"
        return server
    raise ValueError(f"unknown server {name!r}; choose from {', '.join(SERVERS)}")


def _body(x: np.ndarray, short_numbers: bool = False) -> str:
    """TF Serving's JSON for ``x`` as clients that dump numpy arrays write it: float32 values
    at full precision (``json.dumps(array.tolist())``), or, with ``short_numbers``, each
    rounded to 3 digits (a body a third as long)."""
    if short_numbers:
        return json.dumps({"instances": np.round(x.astype(np.float64), 3).tolist()})
    return json.dumps({"instances": x.tolist()})


def _check_answers(server: Server, probe: Path) -> None:
    """Every server must give in-process TensorFlow's answers before it is measured."""
    if server.name.startswith("raw-asgi-"):
        return  # no model: it answers zeros by design
    with np.load(probe) as data, httpx.Client(timeout=30) as http:
        for n in INSTANCES:
            response = http.post(server.url, content=_body(data[f"x{n}"]), headers={"content-type": "application/json"})
            got = np.array(response.json()["predictions"], np.float32)
            if not np.allclose(got, data[f"y{n}"], rtol=1e-4, atol=1e-4):
                raise RuntimeError(f"{server.name} gave wrong answers for {n} instances")


def _broker_stats(server: Server) -> dict[str, int] | None:
    if not server.address:
        return None
    with Client(server.address, timeout_s=5) as client:
        return client.stats()


def _medians(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (server, instances, concurrency), the round with the median requests/s, and every round's."""
    by_cell: dict[tuple[str, int, int], list[dict[str, Any]]] = {}
    for run_ in runs:
        by_cell.setdefault((run_["server"], run_["instances"], run_["concurrency"]), []).append(run_)
    cells = []
    for same in by_cell.values():
        same.sort(key=lambda r: r["requests"] / r["duration_s"])
        cell = same[len(same) // 2]
        cell["runs_rps"] = [round(r["requests"] / r["duration_s"], 1) for r in same]
        cells.append(cell)
    return cells


def _measure(server: Server, config: BenchConfig, load: Any) -> dict[str, Any]:
    root = server.process.pid  # type: ignore[union-attr]
    stats0, cpu0, host0 = _broker_stats(server), cpu_by_role(root), host_cpu_ticks()
    result = load()
    host1, cpu1, stats1 = host_cpu_ticks(), cpu_by_role(root), _broker_stats(server)
    result["host_busy"] = (host1[0] - host0[0]) / max(1, host1[1] - host0[1])
    requests = max(1, result["requests"])
    result["cpu_ms_per_request"] = {role: (cpu1.get(role, 0.0) - cpu0.get(role, 0.0)) * 1000 / requests
                                    for role in cpu1 if role != "other"}
    if stats0 and stats1 and stats1["batches"] > stats0["batches"]:
        result["mean_batch_rows"] = (stats1["rows"] - stats0["rows"]) / (stats1["batches"] - stats0["batches"])
    result["pss_mb"] = total_pss_mb(root)
    return result


def _http_series(server: Server, probe: Path, config: BenchConfig) -> list[dict[str, Any]]:
    cells = []
    with np.load(probe) as data:
        bodies = {n: _body(data[f"x{n}"], config.short_numbers) for n in INSTANCES}
    wrk(server.url, bodies[1], 16, 2)  # warm up
    for n in config.instances:
        for c in CONCURRENCY:
            cell = _measure(server, config, functools.partial(wrk, server.url, bodies[n], c, config.duration_s))
            cell.update(server=server.name, instances=n, concurrency=c)
            cells.append(cell)
            log(f"{server.name} n={n} c={c}: {cell['requests'] / cell['duration_s']:.0f} req/s, "
                f"p50 {cell['p50_ms']:.2f} ms, p99 {cell['p99_ms']:.2f} ms, errors {cell['errors']}")
    return cells


def _client_series(server: Server, probe: Path, config: BenchConfig) -> list[dict[str, Any]]:
    cells = []
    client_load(server.address, str(probe), 1, 16, 2)  # warm up
    for n in config.instances:
        for c in CLIENT_CONCURRENCY:
            cell = _measure(server, config, functools.partial(client_load, server.address, str(probe), n, c,
                                                           config.duration_s))
            cell.update(server="client", instances=n, concurrency=c)
            cells.append(cell)
            log(f"client n={n} c={c}: {cell['requests'] / cell['duration_s']:.0f} req/s, "
                f"p50 {cell['p50_ms']:.2f} ms, p99 {cell['p99_ms']:.2f} ms, errors {cell['errors']}, "
                f"wrong {cell['wrong']}")
    return cells
