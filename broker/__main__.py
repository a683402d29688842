"""``python -m broker``: TF Serving's flags in, a running broker with its workers and frontends out."""

from __future__ import annotations

import argparse
import importlib.metadata
import sys

from broker.config import ServerConfig
from tfbroker.wire.errors import ConfigError
from tfbroker.runtime.flags import add_dataclass_flags, dataclass_from_args


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m broker",
        description="tfbroker: one copy of each TensorFlow model, many HTTP frontends, dynamic batching. "
                    "With no model flags it makes demo models and serves them.")
    parser.add_argument("--version", action="version", version=version_text(),
                        help="Print the version (tfbroker's, and the TF Serving APIs it speaks) and exit.")
    add_dataclass_flags(parser, ServerConfig)
    args = parser.parse_args(argv)
    try:
        config = dataclass_from_args(ServerConfig, args)
    except ConfigError as exc:
        parser.error(str(exc))
    from broker.app import run

    sys.exit(run(config))


def version_text() -> str:
    try:
        own = importlib.metadata.version("tfbroker")
    except importlib.metadata.PackageNotFoundError:
        own = "unknown"
    return f"tfbroker {own}: TensorFlow Serving's REST and gRPC APIs (tensorflow.serving)"


if __name__ == "__main__":
    main()
