"""``python -m broker.tune``: the batching setting for your model, on your hardware, measured.

It starts tfbroker on the model, sends it synthetic requests built from its signature (or a
file of real ones) at each load of a ladder of concurrency, and sweeps in three stages, each
keeping the best of the one before: ``max_batch_size`` × ``batch_timeout_micros`` (each a
hot-swapped version, no restart), then TensorFlow's thread pools
(``--tensorflow_intra_op_parallelism``/``--tensorflow_inter_op_parallelism``), then
``--batches_in_flight``, then ``--frontends`` (a restart each). It prints a table of requests a second, p50 and p99 per setting and load, the
best setting whose p99 meets ``--p99_ms`` (the most requests a second), and its batching
parameters file and flags; then it measures that setting again on a fresh broker. ``--json``
for machines, ``--plot`` for p99 against throughput.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

from broker.tune import inputs, report
from broker.tune.load import LevelResult, run_level
from broker.tune.report import Choice, Measured
from broker.tune.server import TunedBroker, TuneError, latest_version_dir
from broker.tune.settings import Setting

WARMUP_S = 1.0  # of load at the highest concurrency before each setting is measured (its batch sizes traced)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m broker.tune", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model_base_path", required=True, help="the model's base path (numeric version "
                        "directories; the newest is tuned)")
    parser.add_argument("--model_name", default="", help="its name (default: the base path's last part)")
    parser.add_argument("--signature_name", default="serving_default")
    parser.add_argument("--p99_ms", type=float, default=None, help="the p99 latency to stay within")
    parser.add_argument("--requests", default="", help="a file of real requests, one TF Serving REST predict "
                        "body (JSON) per line; default: synthetic ones from the signature")
    parser.add_argument("--rows_per_request", type=int, default=1, help="rows of each synthetic request")
    parser.add_argument("--concurrency", default="1,4,16,64", help="the ladder of loads (connections)")
    parser.add_argument("--duration_s", type=float, default=1.5, help="seconds measured at each load")
    parser.add_argument("--max_batch_sizes", default="8,32,128")
    parser.add_argument("--batch_timeouts_micros", default="0,1000,5000")
    parser.add_argument("--tensorflow_threads", default="0:0,1:-1", help="intra:inter op parallelism pairs "
                        "(0:0 is TensorFlow's choice; 1:-1 runs each op in the calling thread, often best on few cores)")
    parser.add_argument("--batches_in_flight", default="1,2,4")
    parser.add_argument("--frontends", default="1,2,4")
    parser.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                        help="measure the recommended setting again on a fresh broker")
    parser.add_argument("--json", action="store_true", help="print the results as JSON, nothing else on stdout")
    parser.add_argument("--plot", default="", help="write p99 against requests a second per setting to this "
                        "image (needs matplotlib)")
    parser.add_argument("--batching_parameters_out", default="", help="write the recommended batching "
                        "parameters file here")
    parser.add_argument("broker_args", nargs="*", help="more flags for the broker, after --")
    args = parser.parse_args(argv)
    try:
        for name in ("concurrency", "max_batch_sizes", "batch_timeouts_micros", "batches_in_flight", "frontends"):
            values = [int(v) for v in getattr(args, name).split(",") if v.strip()]
            if not values or min(values) < (0 if name == "batch_timeouts_micros" else 1):
                raise ValueError(f"--{name} needs positive whole numbers")
            setattr(args, name, values)
        args.tensorflow_threads = [tuple(int(n) for n in pair.split(":")) for pair in args.tensorflow_threads.split(",")
                                   if pair.strip()]
        if not args.tensorflow_threads or any(len(pair) != 2 for pair in args.tensorflow_threads):
            raise ValueError("--tensorflow_threads needs intra:inter pairs, such as 0:0,1:-1")
    except ValueError as exc:
        parser.error(str(exc))
    if args.duration_s <= 0 or args.rows_per_request < 1:
        parser.error("--duration_s and --rows_per_request must be positive")
    args.model_name = args.model_name or Path(args.model_base_path.rstrip("/")).name
    return args


class Tuner:
    def __init__(self, args: argparse.Namespace, server: TunedBroker, progress: Any) -> None:
        self.args = args
        self.server = server
        self.progress = progress
        self.bodies: list[bytes] = []
        self.measured: list[Measured] = []

    def run(self) -> tuple[Choice | None, LevelResult | None]:
        args = self.args
        threads = args.tensorflow_threads[0]
        defaults = Setting(args.max_batch_sizes[0], args.batch_timeouts_micros[0], 2 if 2 in args.batches_in_flight
                           else args.batches_in_flight[0], 2 if 2 in args.frontends else args.frontends[0], *threads)
        stage1 = [replace(defaults, max_batch_size=size, batch_timeout_micros=timeout)
                  for size in args.max_batch_sizes for timeout in args.batch_timeouts_micros]
        total = len(stage1) + len(set(args.tensorflow_threads) - {threads}) + \
            len(set(args.batches_in_flight) - {defaults.batches_in_flight}) + \
            len(set(args.frontends) - {defaults.frontends}) + bool(args.verify)
        self.task = self.progress.add_task("tuning", total=total * len(args.concurrency))
        for setting in stage1:
            self.measure(setting)
        # Each further stage varies one thing of the best so far (a restart each).
        for name, values in (("threads", args.tensorflow_threads), ("batches_in_flight", args.batches_in_flight),
                             ("frontends", args.frontends)):
            chosen = self.best_setting()
            for value in values:
                setting = (replace(chosen, intra_op_threads=value[0], inter_op_threads=value[1]) if name == "threads"
                           else replace(chosen, **{name: value}))
                if setting != chosen:
                    self.measure(setting)
        choice = report.best(self.measured, args.p99_ms)
        verified = None
        if choice is not None and args.verify:
            self.server.stop()  # a fresh broker, as the user will start it
            self.server.apply(choice.setting)
            self.describe(f"measuring {choice.setting.label()} again")
            self.load(choice.level.concurrency, WARMUP_S)
            verified = self.load(choice.level.concurrency, args.duration_s * 2)
            self.progress.update(self.task, advance=len(args.concurrency), refresh=True)
        return choice, verified

    def measure(self, setting: Setting) -> None:
        self.describe(f"serving {setting.label()}")
        self.server.apply(setting)
        if not self.bodies:
            self.bodies = (inputs.file_bodies(self.args.requests) if self.args.requests else
                           inputs.synthetic_bodies(self.server.metadata(), self.args.signature_name,
                                                   self.args.rows_per_request))
        self.load(max(self.args.concurrency), WARMUP_S)
        measured = Measured(setting)
        self.measured.append(measured)
        for concurrency in self.args.concurrency:
            self.describe(f"{setting.label()}: {concurrency} connections")
            measured.levels.append(self.load(concurrency, self.args.duration_s))
            self.progress.update(self.task, advance=1, refresh=True)

    def load(self, concurrency: int, duration_s: float) -> LevelResult:
        return run_level("127.0.0.1", self.server.port, self.server.path, self.bodies, concurrency, duration_s)

    def best_setting(self) -> Setting:
        choice = report.best(self.measured, self.args.p99_ms)
        if choice is None:
            raise TuneError("every request failed; the broker's warnings and errors:\n" + self.server.log_tail())
        return choice.setting

    def describe(self, text: str) -> None:
        self.progress.update(self.task, description=text, refresh=True)


def main(argv: Sequence[str] | None = None) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    args = parse_args(argv)
    console = Console(stderr=args.json)
    started = time.monotonic()
    try:
        source = latest_version_dir(args.model_base_path)
    except TuneError as exc:
        print(f"tfbroker.tune: {exc}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="tfbroker-tune-") as work:
        server = TunedBroker(args.model_name, source, Path(work), list(args.broker_args))
        columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TimeElapsedColumn())
        try:
            # Refreshed by hand between measurements: rich's refresh thread would take the GIL
            # from the load generator mid-measurement (a stall of up to 5 ms, ten times a second).
            with Progress(*columns, console=Console(stderr=True), transient=True, auto_refresh=False) as progress:
                tuner = Tuner(args, server, progress)
                choice, verified = tuner.run()
        except (TuneError, ValueError) as exc:
            print(f"tfbroker.tune: {exc}", file=sys.stderr)
            return 1
        finally:
            server.stop()
    elapsed = time.monotonic() - started
    if args.plot:
        report.plot(tuner.measured, args.plot)
    if choice is not None and args.batching_parameters_out:
        Path(args.batching_parameters_out).write_text(choice.setting.batching_parameters())
    if args.json:
        json.dump(report.as_json(args.model_name, tuner.measured, choice, args.p99_ms, verified, elapsed), sys.stdout,
                  indent=1)
        sys.stdout.write("\n")
        return 0 if choice is not None else 1
    console.print(report.table(tuner.measured, choice))
    _print_choice(console, args, choice, verified, elapsed)
    return 0 if choice is not None else 1


def _print_choice(console: Any, args: argparse.Namespace, choice: Choice | None, verified: LevelResult | None,
                  elapsed: float) -> None:
    if choice is None:
        console.print("[red]No setting answered without errors.[/red]")
        return
    level = choice.level
    target = f" within a p99 of {args.p99_ms:g} ms" if args.p99_ms is not None else ""
    if not choice.meets_target:
        console.print(f"[yellow]No setting kept p99 within {args.p99_ms:g} ms; the lowest p99 seen:[/yellow]")
    console.print(f"Best{target}: {choice.setting.label()}: {level.rps:,.0f} req/s at {level.concurrency} "
                  f"connections, p50 {level.p50_ms:.2f} ms, p99 {level.p99_ms:.2f} ms.")
    if verified is not None:
        # The sweep's best figure is the luckiest of many short runs; this one is what to expect.
        console.print(f"Measured again on a fresh broker, {args.duration_s * 2:g} s: {verified.rps:,.0f} req/s "
                      f"({verified.rps / level.rps:.0%} of the sweep's figure), p50 {verified.p50_ms:.2f} ms, "
                      f"p99 {verified.p99_ms:.2f} ms.")
    console.print("\nbatching.pbtxt (--batching_parameters_file):\n")
    console.print(choice.setting.batching_parameters(), markup=False, highlight=False)
    console.print(f"python -m broker --model_name={args.model_name} --model_base_path={args.model_base_path} "
                  f"{choice.setting.flags()}", markup=False, highlight=False, soft_wrap=True)
    console.print(f"\n({elapsed:.0f} s; the load came from this process, on the same host.)")


if __name__ == "__main__":
    sys.exit(main())
