"""``python -m bench.lookups``: the I/O batcher's worth, side by side in one run.

1. Lookups per second through the I/O batcher, batched (``--lookup_max_batch_size`` 512,
   the default) against one request per lookup batch (``--lookup_max_batch_size=1``), for
   the text model's tables on local files and with its user table in a real Redis
   (redis-server on loopback: the I/O-bound case).
2. End to end at c=64 (wrk): the text model with its lookups in the I/O batcher against the
   same model with the same lookups inside the SavedModel (tf.lookup, the user table a
   variable in the worker): req/s, p99, the worker's PSS (the table no longer in it) and the
   CPU per request of each role.

Every server runs at once (idle ones cost nothing) and the runs are interleaved, repeated
``--repeat`` times; medians are printed. Each request is one instance of 8 words drawn from
a Zipf distribution (frequent words repeat across requests, as in text) and a user.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bench.load import wrk
from bench.run import _python, log
from bench.servers import Server, cpu_by_role, pss_bytes, role, tfbroker_server, tree
from tfbroker import Client

WORDS = 8


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.lookups", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=100_000)
    parser.add_argument("--users", type=int, default=500_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--duration_s", type=float, default=5.0)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    if not shutil.which("wrk") or not shutil.which("redis-server"):
        sys.exit("bench.lookups needs wrk and redis-server (apt-get install wrk redis-server)")
    work = Path(tempfile.mkdtemp(prefix="bench-lookups-"))
    redis = subprocess.Popen(["redis-server", "--port", "0", "--unixsocket", str(work / "redis.sock"), "--save", "",
                              "--appendonly", "no"], stdout=subprocess.DEVNULL)
    servers: dict[str, Server] = {}
    try:
        log(f"making the models ({args.vocab} words, {args.users} users x {args.dim}) in {work}")
        _python("-c", "import sys; from bench.lookups import make_models; make_models(*sys.argv[1:])",
                str(work), str(args.vocab), str(args.users), str(args.dim), timeout_s=1200)
        fill_redis(work)
        bodies = make_bodies(work, 2000)
        extra = ["--file_system_poll_wait_seconds=0"]
        plans = {
            "iobatcher, batched": ("outside", extra),
            "iobatcher, 1 request per batch": ("outside", [*extra, "--lookup_max_batch_size=1"]),
            "redis, batched": ("redis", extra),
            "redis, 1 request per batch": ("redis", [*extra, "--lookup_max_batch_size=1"]),
            "lookups inside the SavedModel": ("inside", extra),
        }
        for port, (name, (model, flags)) in enumerate(plans.items(), start=18600):
            server = tfbroker_server(str(work / model), 2, port, str(work / f"rt{port}"), flags, model="text")
            server.name = name
            server.probe = json.loads(bodies[0])
            servers[name] = server
            server.start()
            log(f"{name}: up")
        results: dict[str, list[dict[str, Any]]] = {name: [] for name in servers}
        for rep in range(args.repeat):
            for name, server in servers.items():
                results[name].append(measure(server, bodies, args.concurrency, args.duration_s))
                log(f"round {rep + 1}/{args.repeat} {name}: {results[name][-1]['rps']:.0f} req/s")
        print(report(results, args))
    finally:
        for server in servers.values():
            server.stop()
        redis.terminate()
        redis.wait(10)
        shutil.rmtree(work, ignore_errors=True)
    return 0


def make_models(work: str, vocab: str, users: str, dim: str) -> None:
    """Run in a child (TensorFlow): the text model with its lookups outside (files), with the
    user table in Redis, and with both inside the SavedModel."""
    from workers.demo_models import make_text_tables, save_text_model

    tables = make_text_tables(vocab_size=int(vocab), users=int(users), dim=int(dim))
    save_text_model(os.path.join(work, "outside", "1"), tables)
    save_text_model(os.path.join(work, "inside", "1"), tables, lookups_inside=True)
    shutil.copytree(os.path.join(work, "outside", "1"), os.path.join(work, "redis", "1"))
    declared = os.path.join(work, "redis", "1", "assets.extra", "lookups.json")
    with open(declared) as f:
        lookups = json.load(f)
    lookups["lookups"][1] = {"input": "user", "output": "user_vec", "redis": f"unix://{work}/redis.sock",
                             "key_prefix": "user:", "dim": int(dim)}
    with open(declared, "w") as f:
        json.dump(lookups, f)


def fill_redis(work: Path) -> None:
    import redis

    extra = work / "outside" / "1" / "assets.extra"
    users = (extra / "users.txt").read_text().splitlines()
    vectors = np.load(extra / "users.npy")
    client = redis.Redis(unix_socket_path=str(work / "redis.sock"))
    for start in range(0, len(users), 10_000):
        client.mset({f"user:{u}": vectors[i].astype("<f4").tobytes()
                     for i, u in enumerate(users[start:start + 10_000], start)})
    client.close()


def make_bodies(work: Path, count: int) -> list[str]:
    extra = work / "outside" / "1" / "assets.extra"
    words = (extra / "vocab.txt").read_text().splitlines()
    users = (extra / "users.txt").read_text().splitlines()
    rng = np.random.default_rng(0)
    bodies = []
    for _ in range(count):
        ranks = np.minimum(rng.zipf(1.3, WORDS), len(words)) - 1
        chosen = [words[r] for r in ranks]
        bodies.append(json.dumps({"instances": [{"words": chosen, "user": users[int(rng.integers(len(users)))]}]}))
    return bodies


def measure(server: Server, bodies: list[str], concurrency: int, duration_s: float) -> dict[str, Any]:
    assert server.process is not None
    with Client(server.address) as client:
        before, cpu_before = client.stats(), cpu_by_role(server.process.pid)
        result = wrk(server.url, bodies, concurrency, duration_s)
        after, cpu_after = client.stats(), cpu_by_role(server.process.pid)
    requests = max(1, result["requests"])
    worker_pss = sum(pss_bytes(pid) for pid in tree(server.process.pid) if role(pid) == "worker")
    return {
        "rps": result["requests"] / result["duration_s"], "p50_ms": result["p50_ms"], "p99_ms": result["p99_ms"],
        "errors": result["errors"],
        "lookup_keys_per_s": (after["lookup_keys"] - before["lookup_keys"]) / result["duration_s"],
        "tasks_per_lookup_batch": (after["lookup_tasks"] - before["lookup_tasks"])
        / max(1, after["lookup_batches"] - before["lookup_batches"]),
        "distinct_share": (after["lookup_unique_keys"] - before["lookup_unique_keys"])
        / max(1, after["lookup_keys"] - before["lookup_keys"]),
        "worker_pss_mb": worker_pss / 2**20,
        "cpu_ms_per_request": {r: 1000 * (cpu_after.get(r, 0.0) - cpu_before.get(r, 0.0)) / requests
                               for r in ("frontends", "broker", "iobatcher", "worker")},
        "load_cpu_ms_per_request": 1000 * result["load_cpu_s"] / requests,
    }


def report(results: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> str:
    def med(runs: list[dict[str, Any]], key: str, sub: str | None = None) -> float:
        return statistics.median(r[key][sub] if sub else r[key] for r in runs)

    lines = [f"bench.lookups: text model, {args.vocab} words, {args.users} users x {args.dim}, c={args.concurrency}, "
             f"{args.duration_s:.0f} s x {args.repeat} interleaved (medians)", "",
             "| server | req/s | p50 ms | p99 ms | errors | lookup keys/s | requests/lookup batch | distinct keys "
             "| worker PSS MB | CPU ms/req frontends | broker | iobatcher | worker |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, runs in results.items():
        lines.append(
            f"| {name} | {med(runs, 'rps'):.0f} | {med(runs, 'p50_ms'):.1f} | {med(runs, 'p99_ms'):.1f} | "
            f"{sum(r['errors'] for r in runs)} | {med(runs, 'lookup_keys_per_s'):.0f} | "
            f"{med(runs, 'tasks_per_lookup_batch'):.1f} | {100 * med(runs, 'distinct_share'):.0f}% | "
            f"{med(runs, 'worker_pss_mb'):.0f} | "
            + " | ".join(f"{med(runs, 'cpu_ms_per_request', r):.3f}" for r in ("frontends", "broker", "iobatcher",
                                                                               "worker")) + " |")
    rps = {name: med(runs, "rps") for name, runs in results.items()}
    lines += ["", f"batched / one request per batch: local {rps['iobatcher, batched'] / rps['iobatcher, 1 request per batch']:.2f}x, "
              f"redis {rps['redis, batched'] / rps['redis, 1 request per batch']:.2f}x; "
              f"I/O batcher / lookups inside the SavedModel: {rps['iobatcher, batched'] / rps['lookups inside the SavedModel']:.2f}x"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
