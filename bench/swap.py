"""``python -m bench.swap``: hot version swaps under steady HTTP load, timed.

Serves bench's mlp (versions made with different seeds) from tfbroker-2, keeps ``--concurrency``
keep-alive HTTP clients posting one instance each, and moves ``--swaps`` new version
directories into the base path (an atomic rename, the way to publish a version). For each
swap it reports the time from the directory appearing to the first answer from the new
version and to the old version's END, and latency while the swap runs against steady state.
Every answer must be 200; the X-Model-Version header says which version served it.
"""

from __future__ import annotations

import argparse
import http.client
import json
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.run import _python, log
from bench.servers import tfbroker_server

PORT = 8531


@dataclass(slots=True)
class Answer:
    sent_at: float
    latency_s: float
    status: int
    version: str


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.swap", description=__doc__.split("\n\n")[0])
    parser.add_argument("--swaps", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--steady_s", type=float, default=5.0, help="steady state measured before the swaps")
    parser.add_argument("--out", default="bench/results", help="directory for swap.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-swap-") as tmp:
        work = Path(tmp)
        log("making mlp versions")
        seeds = ", ".join(f"save_mlp({str(work / 'templates' / str(n))!r}, seed={n})"
                          for n in range(1, args.swaps + 2))
        _python("-c", f"from workers.demo_models import save_mlp; {seeds}")
        base = work / "mlp"
        base.mkdir()
        shutil.copytree(work / "templates" / "1", base / "1")
        server = tfbroker_server(str(base), 2, PORT, tempfile.mkdtemp(prefix="tfb-", dir="/tmp"))
        server.start()
        try:
            results = _run(server.url, base, work, args)
        finally:
            server.stop()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "swap.json").write_text(json.dumps(results, indent=2))
    print(_table(results))
    return 0 if results["errors"] == 0 else 1


def _run(url: str, base: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    answers: list[Answer] = []
    stop = threading.Event()
    body = json.dumps({"instances": [np.full(256, 0.5, np.float32).tolist()]}).encode()
    threads = [threading.Thread(target=_client, args=(url, body, answers, stop), daemon=True)
               for _ in range(args.concurrency)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)  # warm
    steady_from = time.monotonic()
    time.sleep(args.steady_s)
    steady_to = time.monotonic()
    swaps = []
    status_url = url.rsplit(":", 1)[0]
    with httpx.Client(timeout=5) as http:
        for new in range(2, args.swaps + 2):
            staging = base.parent / f"staging-{new}"
            shutil.copytree(work / "templates" / str(new), staging)
            appeared = time.monotonic()
            staging.rename(base / str(new))
            ended = _wait_end(http, status_url, new - 1)
            swaps.append({"version": new, "appeared": appeared, "old_end_s": ended - appeared})
            log(f"swap to version {new}: old version ended {ended - appeared:.2f} s after the directory appeared")
            time.sleep(1.0)
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
    steady = [a for a in answers if steady_from <= a.sent_at < steady_to]
    for swap in swaps:
        first = min((a.sent_at + a.latency_s for a in answers
                     if a.version == str(swap["version"]) and a.sent_at >= swap["appeared"]), default=None)
        swap["first_answer_s"] = None if first is None else first - swap["appeared"]
        during = [a for a in answers if swap["appeared"] <= a.sent_at <= swap["appeared"] + swap["old_end_s"]]
        swap.update(_latency(during))
        del swap["appeared"]
    return {"concurrency": args.concurrency, "steady": _latency(steady), "swaps": swaps,
            "errors": sum(1 for a in answers if a.status != 200), "answers": len(answers)}


def _client(url: str, body: bytes, answers: list[Answer], stop: threading.Event) -> None:
    host, _, rest = url.removeprefix("http://").partition("/")
    name, _, port = host.partition(":")
    connection = http.client.HTTPConnection(name, int(port), timeout=30)
    headers = {"Content-Type": "application/json"}
    while not stop.is_set():
        started = time.monotonic()
        try:
            connection.request("POST", "/" + rest, body, headers)
            response = connection.getresponse()
            response.read()
            status, version = response.status, response.getheader("x-model-version") or ""
        except (OSError, http.client.HTTPException):
            connection.close()
            status, version = 0, ""
        answers.append(Answer(started, time.monotonic() - started, status, version))


def _wait_end(http: httpx.Client, status_url: str, version: int, timeout_s: float = 300.0) -> float:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        states = {v["version"]: v["state"] for v in http.get(status_url).json()["model_version_status"]}
        if states.get(str(version)) == "END":
            return time.monotonic()
        time.sleep(0.05)
    raise RuntimeError(f"version {version} did not unload within {timeout_s:.0f} s")


def _latency(answers: list[Answer]) -> dict[str, Any]:
    if not answers:
        return {"requests": 0}
    ms = np.array([a.latency_s for a in answers]) * 1000
    return {"requests": len(answers), "p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2), "max_ms": round(float(ms.max()), 2)}


def _table(results: dict[str, Any]) -> str:
    steady = results["steady"]
    lines = [f"concurrency {results['concurrency']}, {results['answers']} answers, {results['errors']} errors",
             "", "| | to first answer from the new version | old version END | requests | p50 | p99 | max |",
             "|---|---:|---:|---:|---:|---:|---:|",
             f"| steady state | | | {steady['requests']} | {steady['p50_ms']} ms | {steady['p99_ms']} ms | "
             f"{steady['max_ms']} ms |"]
    for swap in results["swaps"]:
        first = f"{swap['first_answer_s']:.2f} s" if swap["first_answer_s"] is not None else "never"
        lines.append(f"| swap to {swap['version']} | {first} | {swap['old_end_s']:.2f} s | {swap['requests']} | "
                     f"{swap.get('p50_ms', '-')} ms | {swap.get('p99_ms', '-')} ms | {swap.get('max_ms', '-')} ms |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
