"""gunicorn settings for tfbroker frontends (the broker runs with --frontends=0).

    TFBROKER_ADDRESS=ipc:///run/tfbroker/frontend.sock \
        gunicorn -c ops/gunicorn.conf.py frontend.app:app

Frontends hold no model, so run as many as the HTTP load needs (about one per core).
"""

import os

worker_class = "uvicorn_worker.UvicornWorker"
workers = int(os.environ.get("TFBROKER_FRONTENDS", os.cpu_count() or 2))
bind = os.environ.get("TFBROKER_BIND", "0.0.0.0:8501")
# A request waits at most TFBROKER_TIMEOUT_MS (default 30 s) for the model; leave room.
timeout = 60
graceful_timeout = 30
keepalive = 5
accesslog = None


def post_fork(server, worker):  # noqa: ANN001 - gunicorn's hook signature
    # N in the process title "tfbroker: frontend:N" (set by the app at start-up).
    os.environ["TFBROKER_FRONTEND_INDEX"] = str(worker.age)
