"""``python -m frontend``: one HTTP frontend on a listening socket inherited from the broker."""

from __future__ import annotations

import argparse
import os
import socket

from broker.config import FRONTEND_INDEX_ENV
from broker.process import die_with_parent, set_title, setup_logging


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m frontend", description=__doc__)
    parser.add_argument("--fd", type=int, required=True, help="Inherited listening socket.")
    parser.add_argument("--index", type=int, required=True, help="N in 'tfbroker: frontend:N'.")
    parser.add_argument("--log_level", default="info")
    args = parser.parse_args(argv)
    run(args.fd, args.index, args.log_level)


def run(fd: int, index: int, log_level: str) -> None:
    os.environ[FRONTEND_INDEX_ENV] = str(index)
    set_title(f"frontend:{index}")
    setup_logging(log_level, f"frontend:{index}")
    die_with_parent()
    import uvicorn

    sock = socket.socket(fileno=fd)
    config = uvicorn.Config("frontend.app:app", loop="auto", http="auto", lifespan="on",
                            access_log=False, log_level=log_level, timeout_graceful_shutdown=30)
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
