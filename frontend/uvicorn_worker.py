"""The frontends' gunicorn worker and logger classes.

FrontendWorker is uvicorn's worker without its proxy-headers middleware: the REST API reads
neither the client's address nor X-Forwarded-*, and the middleware is one more coroutine
frame on every request's way (resumed at each await).

FrontendLogger writes gunicorn's and uvicorn's lines in tfbroker's format (broker/logs.py),
so the frontends' log reads like every other process's.
"""

from __future__ import annotations

from typing import Any

from gunicorn.glogging import Logger
from uvicorn_worker import UvicornWorker

from broker import logs


class FrontendWorker(UvicornWorker):
    CONFIG_KWARGS = {**UvicornWorker.CONFIG_KWARGS, "proxy_headers": False}


class FrontendLogger(Logger):
    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        logs.setup_logging(cfg.loglevel, "frontends")  # the master; each worker sets "frontend:N"
        for log in (self.error_log, self.access_log):
            # In place: uvicorn's loggers share these lists in the workers.
            log.handlers[:] = [logs.handler()] if log.handlers else []
            log.propagate = False
