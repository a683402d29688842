"""The frontends' gunicorn worker class: uvicorn's, without its proxy-headers middleware.

The REST API reads neither the client's address nor X-Forwarded-*, and the middleware is one
more coroutine frame on every request's way (resumed at each await)."""

from __future__ import annotations

from uvicorn_worker import UvicornWorker


class FrontendWorker(UvicornWorker):
    CONFIG_KWARGS = {**UvicornWorker.CONFIG_KWARGS, "proxy_headers": False}
