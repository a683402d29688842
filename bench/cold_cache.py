"""``python -m bench.cold_cache``: bench's mlp called at one row with hot and with cold caches.

In a hot loop the model's 9.6 MB of weights stay in the CPU caches; in a server the other
processes evict them between requests, and at one row the call is bound by reading them
back from memory. This measures both, through the worker's own loader and with the
bench's thread settings, to explain the gap between the in-process limit and c=1 latency.
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")
os.environ.setdefault("TF_NUM_INTEROP_THREADS", "-1")

from workers import model as model_lib  # noqa: E402 - after the TensorFlow settings
from workers.demo_models import save_mlp  # noqa: E402

CALLS = 300
EVICT_BYTES = 64 * 2**20  # twice this machine's L3


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="tfb-cold-") as work:
        save_mlp(os.path.join(work, "1"))
        signature = model_lib.load(os.path.join(work, "1")).signatures["serving_default"]
    x = np.random.default_rng(0).standard_normal((1, 256)).astype(np.float32)
    other_work = np.ones(EVICT_BYTES // 8)
    for _ in range(20):
        signature.run({"x": x})
    for label, evict in (("hot (back to back)", False), ("cold (64 MB walked between calls)", True)):
        latencies = []
        for _ in range(CALLS):
            if evict:
                other_work += 1.0  # what the frontends, the broker and the load generator do meanwhile
            started = time.perf_counter()
            signature.run({"x": x})
            latencies.append(time.perf_counter() - started)
        print(f"{label:36s} p50 {np.median(latencies) * 1000:.3f} ms, "
              f"p90 {np.percentile(latencies, 90) * 1000:.3f} ms")


if __name__ == "__main__":
    main()
