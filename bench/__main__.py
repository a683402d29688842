"""``python -m bench``: tfbroker against the in-process limit and the naive baseline, in one run.

Writes results.json, results.md and PNG plots to --out (default bench/results/), and prints
the Markdown table.
"""

from __future__ import annotations

import argparse
import sys

from bench.run import BenchConfig, run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--out", default="bench/results", help="Directory for results and plots.")
    parser.add_argument("--duration_s", type=float, default=5.0, help="Measured seconds per cell.")
    parser.add_argument("--quick", action="store_true", help="A short smoke run: fewer servers and cells.")
    parser.add_argument("--repeat", type=int, default=1,
                        help="Rounds over every server (interleaved); per cell the median requests/s is reported.")
    parser.add_argument("--instances", default="1,32", help="Instances per request, comma-separated.")
    parser.add_argument("--servers", default="", help="Comma-separated subset, e.g. naive-2,tfbroker-4,client.")
    parser.add_argument("--short_numbers", action="store_true",
                        help="Bodies with numbers rounded to 3 digits instead of float32 at full precision.")
    args = parser.parse_args(argv)
    config = BenchConfig(out=args.out, duration_s=2.0 if args.quick else args.duration_s, quick=args.quick,
                         servers=tuple(s for s in args.servers.split(",") if s), repeat=max(1, args.repeat),
                         instances=tuple(int(n) for n in args.instances.split(",")), short_numbers=args.short_numbers)
    sys.exit(run(config))


if __name__ == "__main__":
    main()
