"""``python -m bench.zygote``: model workers forked from the zygote against fresh interpreters.

For each of ``--worker_start=spawn`` and ``zygote``, side by side (the modes alternate in
each round), with the same models on the same machine:

- start to READY: each worker's own time from its start (fork or spawn) to READY, from the
  broker's log ("… is ready (pid P, forked, 0.15 s after its start)"), for bench's mlp;
- hot swap: a new version directory renamed into the base path (polled every 0.1 s) to the
  first answer from it, under a steady client, for bench's mlp and the demo's text model
  (lookups); every answer must be 200;
- crash: SIGKILL to the mlp worker, to the next 200 from a fresh request;
- memory: total PSS of the broker's tree (with one frontend), and of its model side (broker,
  zygote, workers), serving 1, 5, 10 and 20 copies of half_plus_two from one config file, and
  the time until all are AVAILABLE;
- interference: p99 of a steady client of model A, alone and while model B is swapped every
  5 s for a minute.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.run import _python, log
from bench.servers import SERVER_ENV, Server, pss_bytes, total_pss_mb, tree

PORT = 8533
MODES = ("spawn", "zygote")
READY_LINE = re.compile(r"worker for model (\S+) version (\d+) .* is ready \(pid \d+, (forked|spawned), "
                        r"([\d.]+) s after its start\)")
MLP_BODY = {"instances": [np.full(256, 0.5, np.float32).tolist()]}
TEXT_BODY = {"instances": [{"words": ["word0", "w1_1", "w1_2"], "user": "u0"}]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.zygote", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=1, help="each mode once per round, alternating")
    parser.add_argument("--swaps", type=int, default=3)
    parser.add_argument("--sizes", default="1,5,10,20", help="models served at once, for memory")
    parser.add_argument("--interference_s", type=float, default=60.0)
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    results: dict[str, dict[str, list[Any]]] = {mode: {} for mode in MODES}
    with tempfile.TemporaryDirectory(prefix="bench-zygote-") as tmp:
        work = Path(tmp)
        make_models(work, args.swaps)
        for round_ in range(args.rounds):
            for mode in MODES if round_ % 2 == 0 else MODES[::-1]:
                log(f"round {round_ + 1}, {mode}")
                record = results[mode]
                record.setdefault("swap", []).append(swaps(work, mode, args.swaps))
                record.setdefault("crash", []).append(crash(work, mode))
                record.setdefault("interference", []).append(interference(work, mode, args.interference_s))
                for size in map(int, args.sizes.split(",")):
                    record.setdefault(f"memory_{size}", []).append(memory(work, mode, size))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "zygote.json").write_text(json.dumps(results, indent=2))
    print(table(results, args.sizes))
    return 0


def make_models(work: Path, swaps: int) -> None:
    log("making models")
    seeds = "; ".join(f"save_mlp({str(work / 'mlp_versions' / str(n))!r}, seed={n})" for n in range(1, swaps + 2))
    _python("-c", f"from workers.demo_models import save_mlp, save_linear; {seeds}; "
                  f"save_linear({str(work / 'hpt' / '1')!r})")
    _python("-m", "workers.demo_models", str(work / "demo"))


def make_model_config(models: dict[str, Path]) -> str:
    entries = "\n  ".join(f'config {{ name: "{name}" base_path: "{path}" model_platform: "tensorflow" }}'
                          for name, path in models.items())
    return f"model_config_list {{\n  {entries}\n}}\n"


def broker(work: Path, mode: str, models: dict[str, Path], *, frontends: int = 1, probe: str = "",
           body: dict[str, Any] | None = None) -> Server:
    config = work / f"models-{mode}.config"
    config.write_text(make_model_config(models))
    runtime = tempfile.mkdtemp(prefix="tfb-", dir="/tmp")
    return Server(
        name=f"tfbroker-{mode}",
        argv=[sys.executable, "-m", "broker", f"--model_config_file={config}", f"--rest_api_port={PORT}",
              "--rest_api_host=127.0.0.1", f"--frontends={frontends}", f"--runtime_dir={runtime}", "--port=0",
              f"--worker_start={mode}", "--file_system_poll_wait_seconds=0.1"],
        url=f"http://127.0.0.1:{PORT}/v1/models/{probe or next(iter(models))}:predict",
        env=SERVER_ENV, probe=body or MLP_BODY)


def fresh_base(work: Path, name: str, template: Path) -> Path:
    base = work / "served" / name
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    shutil.copytree(template, base / "1")
    return base


def swaps(work: Path, mode: str, count: int) -> dict[str, Any]:
    """Swaps of mlp and of the text model, under a steady client each; READY times from the log."""
    mlp = fresh_base(work, "mlp", work / "mlp_versions" / "1")
    text = fresh_base(work, "text", work / "demo" / "text" / "1")
    server = broker(work, mode, {"mlp": mlp, "text": text})
    server.start()
    found: dict[str, Any] = {}
    try:
        for name, base, body, template in (("mlp", mlp, MLP_BODY, lambda n: work / "mlp_versions" / str(n)),
                                           ("text", text, TEXT_BODY, lambda n: work / "demo" / "text" / "1")):
            url = f"http://127.0.0.1:{PORT}/v1/models/{name}:predict"
            found[name] = swap_under_load(url, base, body, [template(n) for n in range(2, count + 2)])
        found["ready_s"] = [float(m[4]) for m in READY_LINE.finditer(Path(server.log_path).read_text())
                            if m[1] == "mlp" and m[2] != "1"]
    finally:
        server.stop()
    return found


def swap_under_load(url: str, base: Path, body: dict[str, Any], templates: list[Path]) -> dict[str, Any]:
    answers: list[tuple[float, float, int, str]] = []  # sent, latency, status, version
    stop = threading.Event()
    client = threading.Thread(target=steady, args=(url, body, answers, stop), daemon=True)
    client.start()
    first = []
    try:
        for new, template in enumerate(templates, 2):
            staging = base.parent / f"staging-{base.name}-{new}"
            shutil.copytree(template, staging)
            appeared = time.monotonic()
            staging.rename(base / str(new))
            deadline = appeared + 120
            while time.monotonic() < deadline:
                served = [a for a in answers[-50:] if a[3] == str(new)]
                if served:
                    first.append(min(a[0] + a[1] for a in served) - appeared)
                    break
                time.sleep(0.01)
            time.sleep(1.5)  # the old version ends
    finally:
        stop.set()
        client.join(timeout=30)
    return {"first_answer_s": [round(s, 3) for s in first], "errors": sum(a[2] != 200 for a in answers),
            "answers": len(answers)}


def steady(url: str, body: dict[str, Any], answers: list[tuple[float, float, int, str]],
           stop: threading.Event) -> None:
    with httpx.Client(timeout=30) as http:
        while not stop.is_set():
            sent = time.monotonic()
            try:
                response = http.post(url, json=body)
                status, version = response.status_code, response.headers.get("x-model-version", "")
            except httpx.HTTPError:
                status, version = 0, ""
            answers.append((sent, time.monotonic() - sent, status, version))


def crash(work: Path, mode: str) -> float:
    """SIGKILL to the mlp worker, to the next 200 from a fresh request."""
    server = broker(work, mode, {"mlp": fresh_base(work, "mlp", work / "mlp_versions" / "1")})
    server.start()
    try:
        assert server.process is not None
        (worker,) = [pid for pid in tree(server.process.pid) if "worker:mlp" in Path(f"/proc/{pid}/cmdline").read_text()]
        with httpx.Client(timeout=30) as http:
            os.kill(worker, signal.SIGKILL)
            killed = time.monotonic()
            while time.monotonic() - killed < 120:
                if http.post(server.url, json=MLP_BODY).status_code == 200 and not Path(f"/proc/{worker}").exists():
                    return round(time.monotonic() - killed, 3)
                time.sleep(0.005)
        raise RuntimeError("the model did not answer again")
    finally:
        server.stop()


def interference(work: Path, mode: str, seconds: float) -> dict[str, Any]:
    """p99 of a steady client of A (mlp) alone, then while B (another mlp) swaps every 5 s."""
    a = fresh_base(work, "a", work / "mlp_versions" / "1")
    b = fresh_base(work, "b", work / "mlp_versions" / "1")
    server = broker(work, mode, {"a": a, "b": b}, probe="a")
    server.start()
    try:
        url = server.url
        quiet = p99(url, seconds / 2, lambda: None)
        swapped = [1]

        def swap_b() -> None:
            swapped[0] += 1
            staging = b.parent / f"staging-b-{swapped[0]}"
            shutil.copytree(work / "mlp_versions" / str(1 + swapped[0] % 2), staging)
            staging.rename(b / str(swapped[0]))

        busy = p99(url, seconds, swap_b, every_s=5.0)
        return {"alone": quiet, "b_swapping": busy, "swaps": swapped[0] - 1}
    finally:
        server.stop()


def p99(url: str, seconds: float, action: Any, every_s: float = 0.0) -> dict[str, Any]:
    answers: list[tuple[float, float, int, str]] = []
    stop = threading.Event()
    clients = [threading.Thread(target=steady, args=(url, MLP_BODY, answers, stop), daemon=True) for _ in range(2)]
    for client in clients:
        client.start()
    started = time.monotonic()
    next_action = started + every_s
    while time.monotonic() - started < seconds:
        if every_s and time.monotonic() >= next_action:
            action()
            next_action += every_s
        time.sleep(0.02)
    stop.set()
    for client in clients:
        client.join(timeout=30)
    ms = np.array([a[1] for a in answers]) * 1000
    return {"requests": len(answers), "errors": sum(a[2] != 200 for a in answers),
            "p50_ms": round(float(np.percentile(ms, 50)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2)}


def memory(work: Path, mode: str, size: int) -> dict[str, Any]:
    """Total PSS of the broker's tree serving ``size`` copies of half_plus_two, and of its model side."""
    names = [f"hpt{i:02d}" for i in range(size)]
    models = {name: fresh_base(work, name, work / "hpt" / "1") for name in names}
    server = broker(work, mode, models, frontends=1, body={"instances": [1.0]})
    started = time.monotonic()
    server.start(timeout_s=600)
    try:
        with httpx.Client(timeout=30) as http:
            deadline = time.monotonic() + 600
            while not all(http.post(f"http://127.0.0.1:{PORT}/v1/models/{n}:predict",
                                    json={"instances": [1.0]}).status_code == 200 for n in names):
                if time.monotonic() > deadline:
                    raise RuntimeError("not all models became AVAILABLE")
                time.sleep(0.2)
        available_s = time.monotonic() - started
        time.sleep(2.0)  # let the last warm-ups settle
        assert server.process is not None
        pids = tree(server.process.pid)
        titles = {pid: Path(f"/proc/{pid}/cmdline").read_text(errors="replace") for pid in pids
                  if Path(f"/proc/{pid}").exists()}
        model_side = [pid for pid, text in titles.items() if "frontend" not in text and "gunicorn" not in text]
        return {"models": size, "available_s": round(available_s, 1),
                "total_pss_mb": round(total_pss_mb(server.process.pid), 1),
                "model_side_pss_mb": round(sum(pss_bytes(pid) for pid in model_side) / 2**20, 1)}
    finally:
        server.stop()


def table(results: dict[str, dict[str, list[Any]]], sizes: str) -> str:
    def median(values: list[float]) -> str:
        return f"{float(np.median(values)):.2f}" if values else "-"

    lines = ["| | spawn | zygote |", "|---|---:|---:|"]
    row = {mode: results[mode] for mode in MODES}
    lines.append("| mlp worker start to READY, median s | " + " | ".join(
        median([s for r in row[m]["swap"] for s in r["ready_s"]]) for m in MODES) + " |")
    for model in ("mlp", "text"):
        lines.append(f"| {model} swap, directory to first answer, median s (max) | " + " | ".join(
            f"{median([s for r in row[m]['swap'] for s in r[model]['first_answer_s']])} "
            f"({max((s for r in row[m]['swap'] for s in r[model]['first_answer_s']), default=0):.2f})"
            for m in MODES) + " |")
        lines.append(f"| {model} swap, failed requests | " + " | ".join(
            str(sum(r[model]["errors"] for r in row[m]["swap"])) for m in MODES) + " |")
    lines.append("| killed mlp worker to answering again, median s | " + " | ".join(
        median(row[m]["crash"]) for m in MODES) + " |")
    for key, what in (("alone", "A's p99 alone, ms"), ("b_swapping", "A's p99 while B swaps every 5 s, ms")):
        lines.append(f"| {what} | " + " | ".join(median([r[key]["p99_ms"] for r in row[m]["interference"]])
                                                for m in MODES) + " |")
    for size in map(int, sizes.split(",")):
        lines.append(f"| {size} models: PSS MiB, total (model side) / all AVAILABLE after s | " + " | ".join(
            f"{median([r['total_pss_mb'] for r in row[m][f'memory_{size}']])} "
            f"({median([r['model_side_pss_mb'] for r in row[m][f'memory_{size}']])}) / "
            f"{median([r['available_s'] for r in row[m][f'memory_{size}']])}" for m in MODES) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
