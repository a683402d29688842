"""tfbroker's shared package: what every role (broker/, frontend/, workers/, iobatcher/)
stands on, and the public Python client.

    from tfbroker import Client, AsyncClient

- ``tfbroker.wire``: the wire protocol (one module, its frame layout at the top), tensor
  frames, the errors keyed by HTTP status, ZeroMQ and CURVE helpers.
- ``tfbroker.runtime``: process titles and exit codes, logs, flags from dataclasses,
  devices, and ``settings`` (environment names, defaults, limits, each child's configuration).
- ``tfbroker.client`` / ``tfbroker.async_client``: the client, sync and async
  (``frontend.client`` is an alias kept for existing code).

A role imports this package and never another role (checked in CI by import-linter).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tfbroker.async_client import AsyncClient
    from tfbroker.client import Client, Prediction

__all__ = ["AsyncClient", "Client", "Prediction", "__version__"]

__version__ = "0.1.0"  # as pyproject.toml's (a test checks they agree)


def __getattr__(name: str) -> Any:
    # Lazy, so a worker that imports tfbroker.wire does not load the client with it.
    if name == "AsyncClient":
        from tfbroker.async_client import AsyncClient
        return AsyncClient
    if name in ("Client", "Prediction"):
        from tfbroker import client
        return getattr(client, name)
    raise AttributeError(f"module 'tfbroker' has no attribute {name!r}")
