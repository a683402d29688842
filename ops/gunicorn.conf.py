"""gunicorn settings for tfbroker frontends (the broker runs with --frontends=0).

    TFBROKER_ADDRESS=ipc:///run/tfbroker/frontend.sock \
        gunicorn -c ops/gunicorn.conf.py frontend.app:app

The settings live in frontend/gunicorn_conf.py (the broker's all-in-one mode uses them
too); this file is there for deployments that expect a config file.
"""

from frontend.gunicorn_conf import *  # noqa: F401,F403
