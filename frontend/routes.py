"""TF Serving's REST paths, matched as its HTTP handler matches them.

Everything under ``/v1/`` (any case) is the API's: a path that is not a call, or a method
the call does not take, is a 400 ``Malformed request: METHOD PATH``; paths elsewhere are
404. Model names and labels are percent-decoded after matching, so a name may hold any
character but ``/`` and ``:`` as sent.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from urllib.parse import unquote

from tfbroker.wire.errors import InvalidArgument
from tfbroker.wire.fields import MAX_INT64

API_PREFIX = "/v1/"
_NAME = r"([^/:]+)"
_VERSION_OR_LABEL = r"(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?"
_CALL = re.compile(rf"/v1/models/{_NAME}{_VERSION_OR_LABEL}:(classify|regress|predict)", re.IGNORECASE)
_RESOURCE = re.compile(rf"/v1/models(?:/{_NAME})?{_VERSION_OR_LABEL}(?:/(metadata))?", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class RestCall:
    verb: str  # predict, classify, regress (POST); status, metadata (GET)
    model: str
    version: int | None
    label: str | None


def is_api_path(path: str) -> bool:
    return path[:4].lower() == API_PREFIX


@functools.lru_cache(maxsize=1024)  # a frontend sees a few paths over and over; RestCall is frozen
def parse(method: str, path: str) -> RestCall:
    """The call a request makes; InvalidArgument with TF Serving's words if it makes none."""
    name = version = label = None
    if method == "POST" and (match := _CALL.fullmatch(path)):
        name, version, label, verb = match.groups()
        verb = verb.lower()
    elif method == "GET" and (match := _RESOURCE.fullmatch(path)):
        name, version, label, metadata = match.groups()
        verb = "metadata" if metadata else "status"
        if not name:
            raise InvalidArgument("Missing model name in request.")
    else:
        raise InvalidArgument(f"Malformed request: {method} {path}")
    if version is not None and int(version) > MAX_INT64:
        raise InvalidArgument(f"Failed to convert version: {version} to numeric.")
    return RestCall(verb, unquote(name), int(version) if version is not None else None,
                    unquote(label) if label is not None else None)
