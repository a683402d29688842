"""An alias of the public client, kept for code written before it moved: new code writes
``from tfbroker import Client, AsyncClient``."""

from tfbroker.async_client import AsyncClient
from tfbroker.client import Client, ClientBase, Prediction, default_address

__all__ = ["AsyncClient", "Client", "ClientBase", "Prediction", "default_address"]
