"""``python -m bench.broker_ceiling``: the broker alone, driven hard, and what one request costs it.

One broker with no HTTP frontends (``--frontends=0``) serves a model with trivial compute
(y = 0.5x + 2, one float a row) to ``--processes`` processes of the Python client, each
keeping ``--concurrency`` requests in flight for ``--duration_s``. Reports, per run, the
requests per second answered, the broker's CPU per request (its main thread and ZeroMQ's
I/O thread together), its share of a core, the requests per client message (how well the
clients' messages coalesce) and the ceiling the CPU per request gives one broker
(1 / CPU per request: the rate at which its one core is saturated). On a small host the
clients, not the broker, run out of CPU first: the share says how close the broker came.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.servers import ROOT, SERVER_ENV, cpu_seconds, title, tree

PROCESS_ENV = {**SERVER_ENV}


async def _load(address: str, concurrency: int, seconds: float) -> dict[str, float]:
    from tfbroker import AsyncClient

    x = np.array([1.0], np.float32)
    done = errors = 0
    async with AsyncClient(address, timeout_s=10) as client:
        await client.predict("linear", {"x": x})
        stop = time.monotonic() + seconds

        async def loop() -> None:
            nonlocal done, errors
            while time.monotonic() < stop:
                try:
                    result = await client.predict("linear", {"x": x})
                    if float(result.outputs["y"][0]) == 2.5:
                        done += 1
                    else:
                        errors += 1
                except Exception:  # noqa: BLE001 - counted
                    errors += 1

        await asyncio.gather(*[loop() for _ in range(concurrency)])
    return {"requests": done, "errors": errors}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.broker_ceiling", description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", default="2,4", help="comma list: client processes per run")
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight per client process")
    parser.add_argument("--duration_s", type=float, default=5.0)
    parser.add_argument("--load", nargs=3, metavar=("ADDRESS", "CONCURRENCY", "SECONDS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.load:
        try:
            from uvloop import run as run_loop
        except ImportError:
            run_loop = asyncio.run
        print(json.dumps(run_loop(_load(args.load[0], int(args.load[1]), float(args.load[2])))))
        return
    work = Path(tempfile.mkdtemp(prefix="tfb-ceiling-"))
    subprocess.run([sys.executable, "-c", f"from workers.demo_models import save_linear; "
                    f"save_linear({str(work / 'linear' / '1')!r})"], cwd=ROOT, check=True, capture_output=True)
    address = f"ipc://{work}/frontend.sock"
    (work / "batching.pbtxt").write_text("max_batch_size { value: 512 }\nmax_enqueued_batches { value: 1000 }\n")
    broker = subprocess.Popen(
        [sys.executable, "-m", "broker", "--model_name=linear", f"--model_base_path={work / 'linear'}",
         "--frontends=0", "--port=0", f"--runtime_dir={work}", "--log_level=warning",
         "--enable_batching", f"--batching_parameters_file={work / 'batching.pbtxt'}"], cwd=ROOT, env={**PROCESS_ENV},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print("| client processes × in flight | req/s | broker CPU ms/req | broker core share | ceiling req/s "
          "(1 / CPU per request) | requests per client message | errors |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    try:
        _wait_ready(address)
        for processes in [int(p) for p in args.processes.split(",")]:
            _run(address, broker.pid, processes, args.concurrency, args.duration_s)
    finally:
        broker.terminate()
        broker.wait(timeout=60)


def _wait_ready(address: str, timeout_s: float = 120) -> None:
    from tfbroker import Client

    deadline = time.monotonic() + timeout_s
    with Client(address, timeout_s=2) as client:
        while time.monotonic() < deadline:
            try:
                client.predict("linear", {"x": np.array([1.0], np.float32)})
                return
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(0.3)
    raise RuntimeError("the broker did not serve within the time allowed")


def _run(address: str, root: int, processes: int, concurrency: int, seconds: float) -> None:
    from tfbroker import Client

    broker = [pid for pid in tree(root) if title(pid).startswith("tfbroker: broker")] or [root]
    with Client(address, timeout_s=5) as client:
        stats0 = client.stats()
    cpu0, wall0 = cpu_seconds(broker[0]), time.monotonic()
    loads = [subprocess.Popen([sys.executable, "-m", "bench.broker_ceiling", "--load", address, str(concurrency),
                               str(seconds)], cwd=ROOT, stdout=subprocess.PIPE) for _ in range(processes)]
    results = [json.loads(load.communicate(timeout=seconds + 120)[0].decode().strip().splitlines()[-1])
               for load in loads]
    cpu1, wall1 = cpu_seconds(broker[0]), time.monotonic()
    with Client(address, timeout_s=5) as client:
        stats1 = client.stats()
    requests = stats1["requests"] - stats0["requests"] - 1  # less the STATS call's own
    answered = sum(r["requests"] for r in results)
    cpu_ms = (cpu1 - cpu0) * 1000 / max(1, requests)
    messages = stats1["client_messages"] - stats0["client_messages"]
    print(f"| {processes} × {concurrency} | {answered / seconds:.0f} | {cpu_ms:.4f} | {(cpu1 - cpu0) / (wall1 - wall0):.2f} "
          f"| {1000 / cpu_ms:.0f} | {requests / max(1, messages):.1f} | {sum(r['errors'] for r in results)} |", flush=True)


if __name__ == "__main__":
    main()
