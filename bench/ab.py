"""``python -m bench.ab --base REV``: this build against an earlier one, interleaved, at c=64 and 256.

``--api grpc`` loads TF Serving's gRPC Predict (tensor_content, with h2load) instead of its
REST API (wrk). ``--variant NAME=FLAGS`` adds this build with other broker flags (``--base HEAD --variant
inflight1=--batches_in_flight=1`` compares a setting alone).

Checks REV out in a git worktree (same venv), then for each round starts each build alone
(tfbroker, 2 frontends, bench's mlp), warms it up with wrk for 2 s and measures 5 s at each
concurrency (``--concurrency``, default 64,256) of one-instance requests. ``--curve`` adds this build with CURVE on every socket.
Prints each run and the medians, with each role's CPU per request (broker, frontends,
worker: steadier than requests/s on a shared machine): builds compared side by side on a
noisy machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import zmq.auth

import bench.servers as servers
from bench.load import wrk
from bench.run import PORT, log
from bench.servers import ROOT, SERVER_ENV, Server


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the earlier build: a git revision")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--curve", action="store_true", help="also this build with CURVE")
    parser.add_argument("--concurrency", default="64,256", help="comma list of wrk connection counts")
    parser.add_argument("--api", choices=("rest", "grpc"), default="rest", help="which API carries the load")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS",
                        help="also this build with these broker flags, e.g. inflight1=--batches_in_flight=1")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="tfb-ab-"))
    base = work / "base"
    subprocess.run(["git", "worktree", "add", "-q", "--detach", str(base), args.base], cwd=ROOT, check=True)
    try:
        subprocess.run([sys.executable, "-c", f"from workers.demo_models import save_mlp; "
                        f"save_mlp({str(work / 'mlp' / '1')!r})"], cwd=ROOT, check=True, capture_output=True)
        builds: dict[str, tuple[Path, list[str]]] = {f"base ({args.base})": (base, []), "this build": (ROOT, [])}
        if args.curve:
            zmq.auth.create_certificates(str(work), "broker")
            builds["this build, CURVE"] = (ROOT, [f"--curve_secret_key_file={work / 'broker.key_secret'}"])
        for variant in args.variant:
            name, _, flags = variant.partition("=")
            builds[f"this build, {name}"] = (ROOT, flags.split())
        results = run(builds, work, args.rounds, [int(c) for c in args.concurrency.split(",")], args.api)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, check=False)
    print("\n| build | c | req/s (runs) | median | p99 (median) | errors | CPU ms/request (medians) |\n"
          "| --- | ---: | --- | ---: | ---: | ---: | --- |")
    for (name, connections), runs in results.items():
        cpu = {role: statistics.median(r[3].get(role, 0.0) for r in runs) for role in ROLES}
        print(f"| {name} | {connections} | {', '.join(str(round(r[0])) for r in runs)} "
              f"| {round(statistics.median(r[0] for r in runs))} | {statistics.median(r[1] for r in runs):.1f} ms "
              f"| {sum(r[2] for r in runs)} | {', '.join(f'{role} {cpu[role]:.4f}' for role in ROLES)} |")


ROLES = ("broker", "frontends", "worker")
Run = tuple[float, float, int, dict[str, float]]  # requests/s, p99 ms, errors, CPU ms per request by role


GRPC_PORT = 18500


def run(builds: dict[str, tuple[Path, list[str]]], work: Path, rounds: int,
        concurrency: list[int], api: str = "rest") -> dict[tuple[str, int], list[Run]]:
    from bench.grpc_load import h2load, request_bytes

    grpc_body = request_bytes("mlp", 1, 256, "content")

    def load(url: str, connections: int, seconds: float) -> dict[str, float]:
        if api == "grpc":
            return h2load("127.0.0.1", GRPC_PORT, grpc_body, connections, seconds)
        return wrk(url, body, connections, seconds)

    # float32 at full precision, as clients that dump numpy arrays write it (bench.run's body)
    body = json.dumps({"instances": np.random.default_rng(2).standard_normal((1, 256)).astype(np.float32).tolist()})
    results: dict[tuple[str, int], list[Run]] = {
        (name, c): [] for name in builds for c in concurrency}
    for round_ in range(rounds):
        for name, (tree, extra) in builds.items():
            argv = [sys.executable, "-m", "broker", "--model_name=mlp", f"--model_base_path={work / 'mlp'}",
                    f"--rest_api_port={PORT}", "--rest_api_host=127.0.0.1", "--frontends=2",
                    f"--runtime_dir={tempfile.mkdtemp(prefix='tfb-')}", "--log_level=warning", *extra]
            if api == "grpc":
                argv.append(f"--port={GRPC_PORT}")
            elif tree == ROOT:
                argv.append("--port=0")  # no gRPC in this comparison (builds before it had none)
            server = Server(name=name, argv=argv, url=f"http://127.0.0.1:{PORT}/v1/models/mlp:predict", env=SERVER_ENV)
            servers.ROOT = tree  # the build's own packages come first on its path (python -m from its tree)
            try:
                server.start()
                load(server.url, concurrency[0], 2)
                assert server.process is not None
                for connections in concurrency:
                    before = servers.cpu_by_role(server.process.pid)
                    result = load(server.url, connections, 5)
                    after = servers.cpu_by_role(server.process.pid)
                    rate = result["requests"] / result["duration_s"]
                    cpu = {role: (after.get(role, 0.0) - before.get(role, 0.0)) * 1000 / max(result["requests"], 1)
                           for role in ROLES}
                    results[(name, connections)].append((rate, result["p99_ms"], result["errors"], cpu))
                    log(f"round {round_ + 1}: {name}: c={connections} {rate:.0f} requests/s, "
                        f"p99 {result['p99_ms']:.1f} ms, CPU ms/request "
                        + ", ".join(f"{role} {cpu[role]:.4f}" for role in ROLES))
            finally:
                server.stop()
                servers.ROOT = ROOT
    return results


if __name__ == "__main__":
    main()
