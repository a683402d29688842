"""Errors that travel on the wire, each carrying its HTTP status.

    TFBrokerError
    ├── RequestError            the caller can fix it
    │   ├── InvalidArgument     400
    │   ├── NotFound            404
    │   ├── PayloadTooLarge     413  (the body is larger than --max_request_body_bytes)
    │   └── Cancelled           499  (the client gave up; nginx's and gRPC's code)
    └── ServiceError            the server could not do it
        ├── Unavailable         503  (queue full, model not ready, worker died, broker gone)
        ├── DeadlineExceeded    504
        └── Internal            500  (the model failed)

An ERROR message carries ``code`` (the HTTP status) and ``message``; ``from_code`` turns
it back into the same class on the other side, so a Python client sees the exception the
broker or worker raised.

ConfigError is apart from that tree: a flag, file or key that cannot be used (the process
exits with EXIT_CONFIG_ERROR), never sent to a client.
"""

from __future__ import annotations


class TFBrokerError(Exception):
    """Base of every error that can be sent to a client."""

    http_status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class RequestError(TFBrokerError):
    """The request itself is wrong."""

    http_status = 400


class InvalidArgument(RequestError):
    http_status = 400


class NotFound(RequestError):
    http_status = 404


class PayloadTooLarge(RequestError):
    http_status = 413


class Cancelled(RequestError):
    http_status = 499


class ServiceError(TFBrokerError):
    """The request was fine; the service could not serve it now."""

    http_status = 500


class Unavailable(ServiceError):
    http_status = 503


class DeadlineExceeded(ServiceError):
    http_status = 504

    def __init__(self, message: str = "Deadline Exceeded") -> None:  # TF Serving's (gRPC's) words
        super().__init__(message)


class Internal(ServiceError):
    http_status = 500


class ProtocolError(ValueError):
    """A peer sent frames that do not follow tfbroker/wire/protocol.py. Never sent to clients as is."""


_BY_CODE: dict[int, type[TFBrokerError]] = {
    cls.http_status: cls for cls in (InvalidArgument, NotFound, PayloadTooLarge, Cancelled, Unavailable, DeadlineExceeded,
                                      Internal)
}


def from_code(code: int, message: str) -> TFBrokerError:
    """The exception for a wire error code (an HTTP status); unknown codes become Internal."""
    return _BY_CODE.get(code, Internal)(message)


class ConfigError(ValueError):
    """A flag, configuration file, key or install that cannot be used: the process exits with
    EXIT_CONFIG_ERROR and the reason, since a restart will not help. Its own class, so that a
    ValueError from a bug never reads as a bad flag."""
