"""gunicorn settings for the frontends, in all-in-one mode and under your own gunicorn.

    TFBROKER_ADDRESS=ipc:///run/tfbroker/frontend.sock \\
        gunicorn -c python:frontend.gunicorn_conf frontend.app:app

(``ops/gunicorn.conf.py`` is the same settings as a file.) The app is imported once in the
master and the workers are forked from it, so they share its imported modules (about 15 MB
PSS per extra frontend instead of about 25). Each worker opens its own ZeroMQ socket on
first use, after the fork. Frontends hold no model: run about one per core.

Environment: TFBROKER_FRONTENDS (workers), TFBROKER_BIND (address, or fd://N for a socket
inherited from the broker), TFBROKER_TIMEOUT_MS (request deadline), TFBROKER_LOG_LEVEL.
"""

import os

from tfbroker.runtime.settings import BIND_ENV, FRONTEND_INDEX_ENV, FRONTENDS_ENV, LOG_LEVEL_ENV, METRICS_DIR_ENV
from tfbroker.runtime.logs import set_role
from tfbroker.runtime.process import die_with_parent, quiet_gc

worker_class = "frontend.uvicorn_worker.FrontendWorker"
logger_class = "frontend.uvicorn_worker.FrontendLogger"  # tfbroker's log format (tfbroker/runtime/logs.py)
control_socket_disable = True  # gunicorn >= 25 would make ~/.gunicorn/gunicorn.ctl: the broker has its own
workers = int(os.environ.get(FRONTENDS_ENV, os.cpu_count() or 2))
# One address or several, comma-separated (unix:PATH, HOST:PORT, fd://N).
bind = [address.strip() for address in os.environ.get(BIND_ENV, "0.0.0.0:8501").split(",") if address.strip()]
preload_app = True
proc_name = "tfbroker-frontends"
loglevel = os.environ.get(LOG_LEVEL_ENV, "info")
# A request waits at most TFBROKER_TIMEOUT_MS (default 30 s) for the model; leave room.
timeout = 60
graceful_timeout = 30
keepalive = 5
accesslog = None


def on_starting(server):  # noqa: ANN001 - gunicorn's hook signature
    die_with_parent()  # when the broker started this gunicorn: go when it goes


def pre_fork(server, worker):  # noqa: ANN001
    # Keep the preloaded modules out of the garbage collector's reach, so the workers'
    # collections do not write to (and so copy) the pages they share with the master, and
    # collect young objects less often (each request makes a few dozen).
    quiet_gc()


def child_exit(server, worker):  # noqa: ANN001
    # A frontend that is gone keeps its counts in the shared metrics, but not its live gauges.
    if os.environ.get(METRICS_DIR_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)


def post_fork(server, worker):  # noqa: ANN001
    # N in the process title "tfbroker: frontend:N" (set by the app at start-up).
    os.environ[FRONTEND_INDEX_ENV] = str(worker.age)
    set_role(f"frontend:{worker.age}")
