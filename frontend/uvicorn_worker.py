"""The frontends' gunicorn worker and logger classes.

FrontendWorker is uvicorn's worker without its proxy-headers middleware (the REST API reads
neither the client's address nor X-Forwarded-*, and the middleware is one more coroutine
frame on every request's way), answering predict requests below ASGI and every answer with one write (frontend/http_protocol.py), and with a shutdown that lets a proxy's pooled connections go
quietly. uvicorn's own graceful shutdown closes idle keep-alive connections at once, and a
request a proxy (nginx) is sending on one at that moment meets a reset: with several upstream
servers nginx runs out of retries and answers 502. LingeringServer first stops accepting, then
for up to LINGER_S answers every request with ``Connection: close`` (so each busy connection
closes after its answer and the proxy drops it from its pool), then shuts down as uvicorn does.

FrontendLogger writes gunicorn's and uvicorn's lines in tfbroker's format (tfbroker/runtime/logs.py),
so the frontends' log reads like every other process's.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
import time
from typing import Any

from gunicorn.arbiter import Arbiter
from gunicorn.glogging import Logger
from uvicorn.server import Server
from uvicorn_worker import UvicornWorker

from tfbroker.runtime import logs
from frontend import app as rest_app
from frontend.http_protocol import frontend_protocol

LINGER_S = 1.0  # at most; it ends as soon as no connection is left


class LingeringServer(Server):
    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        rest_app.closing[0] = True
        if isinstance(rest_app.app, rest_app.RestApi):
            rest_app.app.pipeline.stopping = True  # not ready from now on (health, /v2/health/ready)
        deadline = time.monotonic() + LINGER_S
        while self.server_state.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await super().shutdown(sockets=sockets)

    def handle_exit(self, sig: int, frame: Any) -> None:
        super().handle_exit(sig, frame)
        # uvicorn re-raises the signal once it has shut down, so the process ends by it; gunicorn's
        # master then logs a stop it asked for as an error ("was sent SIGTERM!"). Exit 0 instead.
        self._captured_signals.clear()


class FrontendWorker(UvicornWorker):
    # No "server: uvicorn" header: TF Serving sends none, and each header costs uvicorn two
    # regular-expression checks on every answer.
    CONFIG_KWARGS = {**UvicornWorker.CONFIG_KWARGS, "proxy_headers": False, "http": frontend_protocol() or "auto",
                     "server_header": False}

    async def _serve(self) -> None:
        # uvicorn_worker's own _serve, with LingeringServer in place of uvicorn's Server.
        self.config.app = self.wsgi
        server = LingeringServer(config=self.config)
        self._install_sigquit_handler()
        await server.serve(sockets=self.sockets)
        if not server.started:
            sys.exit(Arbiter.WORKER_BOOT_ERROR)


# gunicorn's and uvicorn's lines about a stop someone asked for: DEBUG, so that a stop at
# --log_level=info reads as one line per process (the broker's).
STOP_CHATTER = ("Handling signal:", "Worker exiting", "Shutting down", "Waiting for application shutdown",
                "Application shutdown complete", "Finished server process", "Waiting for connections to close",
                "Waiting for background tasks", "Error while closing socket")


class QuietStop(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.DEBUG and str(record.msg).startswith(STOP_CHATTER):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


class FrontendLogger(Logger):
    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        logs.setup_logging(cfg.loglevel, "frontends")  # the master; each worker sets "frontend:N"
        for log in (self.error_log, self.access_log):
            # In place: uvicorn's loggers share these lists in the workers.
            log.handlers[:] = [logs.handler()] if log.handlers else []
            log.propagate = False
        for name in ("gunicorn.error", "uvicorn.error"):
            logging.getLogger(name).addFilter(QuietStop())
