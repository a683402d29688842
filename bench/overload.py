"""``python -m bench.overload``: tfbroker at 1×, 1.5×, 2× and 3× its capacity, open loop.

Starts tfbroker (bench's mlp model, 2 frontends), finds its capacity with the closed-loop
generator (256 connections: the requests/s it sustains), then offers multiples of that rate
open loop (bench/openloop.py). For each it prints the admitted (200) throughput and its
ratio to the closed-loop maximum, p50 and p99 of the admitted requests, the share and p99
of the 503s, transport errors, and the peak RSS of the broker and the frontends.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.servers import ROOT, Server, tfbroker_server, tree
from bench.run import PORT, log

MULTIPLES = (1.0, 1.5, 2.0, 3.0)
CAPACITY_CONNECTIONS = 256  # enough to keep every stage busy: the closed-loop maximum
SERVER_CPU, GENERATOR_CPU = "0", "1"  # --pin: the generator (Python too) does not take the server's core


def generate(server: Server, body_file: Path, duration_s: float, *, rate: float = 0.0,
             closed: int = 0, pin: bool = False) -> dict[str, Any]:
    mode = [f"--closed={closed}"] if closed else [f"--rate={rate}"]
    taskset = ["taskset", "-c", GENERATOR_CPU] if pin else []
    result = subprocess.run([*taskset, sys.executable, "-m", "bench.openloop", server.url, str(body_file), *mode,
                             f"--duration_s={duration_s}"], cwd=ROOT, capture_output=True, timeout=duration_s + 120)
    if result.returncode != 0:
        raise RuntimeError(result.stderr.decode()[-800:])
    return dict(json.loads(result.stdout.decode().strip().splitlines()[-1]))


def rss_mb(server: Server) -> dict[str, float]:
    assert server.process is not None
    totals: dict[str, float] = {}
    for pid in tree(server.process.pid):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            name = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
        except OSError:
            continue
        rss = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS"))
        role = ("frontends" if "frontend" in name or "gunicorn" in name else "worker" if "worker" in name
                else "broker" if "broker" in name else "other")
        totals[role] = totals.get(role, 0.0) + rss / 1024
    return {k: round(v, 1) for k, v in totals.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.overload", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration_s", type=float, default=8.0)
    parser.add_argument("--frontends", type=int, default=2)
    parser.add_argument("--extra", default="", help="more broker flags, space-separated")
    parser.add_argument("--pin", action="store_true",
                        help=f"server on CPU {SERVER_CPU}, generator on CPU {GENERATOR_CPU} (on a small host the "
                             "generator's own CPU would otherwise decide the figures)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="tfb-overload-"))
    subprocess.run([sys.executable, "-c", f"from workers.demo_models import save_mlp; save_mlp({str(work / 'mlp' / '1')!r})"],
                   cwd=ROOT, check=True, capture_output=True)
    body = work / "body.json"
    body.write_text(json.dumps({"instances": [[0.5] * 256]}))
    server = tfbroker_server(str(work / "mlp"), args.frontends, PORT, str(work / "rt"),
                             ["--tensorflow_intra_op_parallelism=1", "--tensorflow_inter_op_parallelism=-1",
                              *args.extra.split()])
    if args.pin:
        server.argv = ["taskset", "-c", SERVER_CPU, *server.argv]
    server.start()
    try:
        generate(server, body, 3, closed=CAPACITY_CONNECTIONS, pin=args.pin)  # warm up
        closed = generate(server, body, args.duration_s, closed=CAPACITY_CONNECTIONS, pin=args.pin)
        capacity = closed["ok_per_s"]
        log(f"closed loop, {CAPACITY_CONNECTIONS} connections: {capacity:.0f} requests/s, p99 {closed['ok_p99_ms']} ms")
        rows = []
        for multiple in MULTIPLES:
            time.sleep(2)  # let the previous run's queues empty
            result = generate(server, body, args.duration_s, rate=capacity * multiple, pin=args.pin)
            result["multiple"] = multiple
            result["ok_of_closed_max"] = round(result["ok_per_s"] / capacity, 3)
            result["rss_mb"] = rss_mb(server)
            rows.append(result)
            log(json.dumps(result))
    finally:
        server.stop()
    print(f"\nclosed-loop maximum ({CAPACITY_CONNECTIONS} connections): {capacity:.0f} requests/s, p50 {closed['ok_p50_ms']} ms, "
          f"p99 {closed['ok_p99_ms']} ms\n")
    print("| offered | admitted req/s | × closed max | admitted p50 | admitted p99 | rejected (503) | 503 p99 "
          "| transport errors | RSS broker / frontends / worker |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['multiple']}× ({r['offered_per_s']:.0f}/s) | {r['ok_per_s']:.0f} | {r['ok_of_closed_max']:.2f} "
              f"| {r['ok_p50_ms']} ms | {r['ok_p99_ms']} ms | {100 * r['rejected_share']:.1f} % "
              f"| {r['rejected_p99_ms']} ms | {sum(r['transport_errors'].values()) + r['not_started']} "
              f"| {r['rss_mb'].get('broker', 0)} / {r['rss_mb'].get('frontends', 0)} / {r['rss_mb'].get('worker', 0)} MB |")


if __name__ == "__main__":
    main()
