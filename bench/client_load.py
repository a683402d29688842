"""Closed-loop load through the Python client, checking every answer against in-process TensorFlow.

``python -m bench.client_load ADDRESS PROBE.npz INSTANCES CONCURRENCY SECONDS`` prints JSON.
PROBE.npz holds ``x{INSTANCES}`` inputs and ``y{INSTANCES}`` in-process outputs.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import numpy as np

from tfbroker import AsyncClient


async def run(address: str, x: np.ndarray, y: np.ndarray, concurrency: int, seconds: float) -> dict[str, float]:
    latencies: list[float] = []
    errors = wrong = 0
    # np.allclose's test with the tolerance worked out once: the check runs on every answer,
    # on the cores the server uses, and np.allclose itself costs 17 µs a call.
    tolerance = 1e-4 + 1e-4 * np.abs(y)
    async with AsyncClient(address, timeout_s=10) as client:
        await client.predict("mlp", {"x": x})  # connect
        stop = time.monotonic() + seconds

        async def loop() -> None:
            nonlocal errors, wrong
            while time.monotonic() < stop:
                started = time.perf_counter()
                try:
                    result = await client.predict("mlp", {"x": x})
                except Exception:  # noqa: BLE001 - counted, the load goes on
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - started)
                if not (np.abs(result.outputs["y"] - y) <= tolerance).all():
                    wrong += 1

        cpu0, wall0 = time.process_time(), time.monotonic()
        await asyncio.gather(*[loop() for _ in range(concurrency)])
        wall, cpu = time.monotonic() - wall0, time.process_time() - cpu0
    return {"requests": len(latencies), "duration_s": wall, "errors": errors, "wrong": wrong,
            "p50_ms": float(np.percentile(latencies, 50) * 1000) if latencies else 0.0,
            "p99_ms": float(np.percentile(latencies, 99) * 1000) if latencies else 0.0,
            "load_cpu_s": cpu}


def main() -> None:
    address, probe, instances, concurrency, seconds = sys.argv[1:6]
    with np.load(probe) as data:
        x, y = data[f"x{instances}"], data[f"y{instances}"]
    try:
        from uvloop import run as run_loop
    except ImportError:
        run_loop = asyncio.run
    print(json.dumps(run_loop(run(address, x, y, int(concurrency), float(seconds)))))


if __name__ == "__main__":
    main()
