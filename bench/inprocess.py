"""The ceiling: the serving signature called in-process on prebuilt batches.

``python -m bench.inprocess MODEL_DIR OUT.json [--seconds S]`` (a child of bench, so the
orchestrator never imports TensorFlow). Also writes reference outputs for correctness probes.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import tensorflow as tf

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("out")
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--probe_in", default="", help="npz of probe inputs; outputs go to --probe_out")
    parser.add_argument("--probe_out", default="")
    args = parser.parse_args()
    fn = tf.saved_model.load(args.model).signatures["serving_default"]
    rng = np.random.default_rng(1)
    results = []
    for size in BATCH_SIZES:
        x = tf.constant(rng.standard_normal((size, 256)).astype(np.float32))
        for _ in range(5):
            fn(x=x)["y"].numpy()
        latencies = []
        cpu0, wall0 = time.process_time(), time.perf_counter()
        while time.perf_counter() - wall0 < args.seconds / len(BATCH_SIZES) * 3 or len(latencies) < 20:
            start = time.perf_counter()
            fn(x=x)["y"].numpy()
            latencies.append(time.perf_counter() - start)
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        results.append({
            "batch_size": size,
            "samples_per_s": size * len(latencies) / wall,
            "latency_p50_ms": float(np.percentile(latencies, 50) * 1000),
            "cpu_ms_per_sample": cpu * 1000 / (size * len(latencies)),
        })
    with open(args.out, "w") as fh:
        json.dump(results, fh, indent=1)
    if args.probe_in:
        with np.load(args.probe_in) as data:
            outputs = {key: fn(x=tf.constant(data[key]))["y"].numpy() for key in data.files}
        np.savez(args.probe_out, **outputs)


if __name__ == "__main__":
    main()
