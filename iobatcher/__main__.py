"""``python -m iobatcher``: one I/O batcher (spawned by the broker, never by hand)."""

from __future__ import annotations

import argparse
import sys

from tfbroker.runtime.flags import add_dataclass_flags, dataclass_from_args
from tfbroker.runtime.settings import IoBatcherConfig


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m iobatcher", description=__doc__)
    add_dataclass_flags(parser, IoBatcherConfig)
    config = dataclass_from_args(IoBatcherConfig, parser.parse_args(argv))
    from iobatcher.batcher import run

    sys.exit(run(config))


if __name__ == "__main__":
    main()
