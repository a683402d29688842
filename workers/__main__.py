"""``python -m workers``: one model worker (spawned by the broker, never by hand)."""

from __future__ import annotations

import argparse
import sys

from tfbroker.runtime.flags import add_dataclass_flags, dataclass_from_args
from tfbroker.runtime.settings import WorkerConfig


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m workers", description=__doc__)
    add_dataclass_flags(parser, WorkerConfig)
    config = dataclass_from_args(WorkerConfig, parser.parse_args(argv))
    from workers.worker import run

    sys.exit(run(config))


if __name__ == "__main__":
    main()
