"""``python -m bench.tune``: the tuner on bench's mlp, timed, and its recommendation checked.

1. ``python -m broker.tune --model_base_path=<mlp> --p99_ms=P --json`` with its default sweep,
   timed end to end (target: under 3 minutes on two cores);
2. the recommended setting as a user runs it (``python -m broker`` with the printed batching
   file and flags), measured at the recommended load with the tuner's own load generator for
   ``--seconds``, against the figure the tuner claimed (its measurement on a fresh broker;
   target: within 10 %).

Each round does both; ``--rounds`` repeats them. One JSON object per round on stdout.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.run import _python, log
from bench.servers import ROOT, Server
from broker.tune.inputs import synthetic_bodies
from broker.tune.load import LevelResult, run_level

PORT = 8541


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--p99_ms", type=float, default=20.0)
    parser.add_argument("--seconds", type=float, default=3.0, help="of each run of the recommended setting "
                        "(the tuner's own second measurement is 3 s)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-tune-") as work_dir:
        work = Path(work_dir)
        _python("-c", f"from workers.demo_models import save_mlp; save_mlp({str(work / 'mlp' / '1')!r})")
        for round_ in range(1, args.rounds + 1):
            log(f"round {round_}: python -m broker.tune on mlp, p99 within {args.p99_ms:g} ms")
            started = time.monotonic()
            result = subprocess.run([sys.executable, "-m", "broker.tune", f"--model_base_path={work / 'mlp'}",
                                     f"--p99_ms={args.p99_ms}", "--json"], cwd=ROOT, capture_output=True, text=True,
                                    timeout=900)
            elapsed = time.monotonic() - started
            if result.returncode != 0:
                raise SystemExit(result.stderr[-3000:])
            tuned = json.loads(result.stdout)
            chosen, claimed = tuned["recommendation"], tuned["verified"]
            (work / "batching.pbtxt").write_text(chosen["batching_parameters"])
            flags = chosen["flags"].replace("batching.pbtxt", str(work / "batching.pbtxt")).split()
            # As the user runs it: the tuner's environment (bench's usual TF_NUM_* threads would
            # be a setting the tuner did not choose). Twice, on two fresh brokers: how far two
            # runs of the same setting are apart on this machine is the yardstick.
            again = [measure(work, flags, chosen["concurrency"], args.seconds) for _ in range(2)]
            print(json.dumps({
                "round": round_, "tune_elapsed_s": round(elapsed, 1), "settings_measured": len(tuned["settings"]),
                "recommendation": {k: v for k, v in chosen.items() if k not in ("batching_parameters", "flags")},
                "claimed_rps": claimed["rps"], "claimed_p99_ms": claimed["p99_ms"],
                "again_rps": [round(a.rps, 1) for a in again], "again_p99_ms": [round(a.p99_ms, 3) for a in again],
                "again_errors": sum(a.errors for a in again),
                "again_vs_claimed": [round(a.rps / claimed["rps"], 3) for a in again]}), flush=True)


def measure(work: Path, flags: list[str], concurrency: int, seconds: float) -> LevelResult:
    """The recommended setting on a fresh broker, as a user starts it, at the recommended load."""
    server = Server(name="recommended", url=f"http://127.0.0.1:{PORT}/v1/models/mlp:predict",
                    env={"TF_CPP_MIN_LOG_LEVEL": "2"},
                    argv=[sys.executable, "-m", "broker", "--model_name=mlp", f"--model_base_path={work / 'mlp'}",
                          f"--rest_api_port={PORT}", "--port=0", *flags])
    server.start()
    try:
        # The tuner's kind of requests: random float32 at full precision, from the signature.
        with urllib.request.urlopen(f"http://127.0.0.1:{PORT}/v1/models/mlp/metadata", timeout=10) as answer:
            bodies = synthetic_bodies(json.loads(answer.read()), "serving_default", rows=1)
        path = "/v1/models/mlp:predict"
        run_level("127.0.0.1", PORT, path, bodies, concurrency, 1.0)  # warm
        return run_level("127.0.0.1", PORT, path, bodies, concurrency, seconds)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
