"""Errors that travel on the wire, each carrying its HTTP status and its gRPC code: the one
table every API answers from (TF Serving's REST and gRPC, the Open Inference Protocol's).

    TFBrokerError                     HTTP  gRPC
    ├── RequestError                        the caller can fix it
    │   ├── InvalidArgument           400   INVALID_ARGUMENT
    │   ├── NotFound                  404   NOT_FOUND
    │   ├── PayloadTooLarge           413   RESOURCE_EXHAUSTED  (larger than --max_request_body_bytes)
    │   └── Cancelled                 499   CANCELLED  (the client gave up; nginx's code)
    └── ServiceError                        the server could not do it
        ├── Unavailable               503   UNAVAILABLE  (queue full, not ready, worker died, broker gone)
        ├── DeadlineExceeded          504   DEADLINE_EXCEEDED
        └── Internal                  500   INTERNAL  (the model failed)

``grpc_code`` is the name of a ``grpc.StatusCode`` (this module imports no gRPC). An ERROR
message carries ``code`` (the HTTP status) and ``message``; ``from_code`` turns it back
into the same class on the other side, so a Python client sees the exception the broker or
worker raised.

ConfigError is apart from that tree: a flag, file or key that cannot be used (the process
exits with EXIT_CONFIG_ERROR), never sent to a client.
"""

from __future__ import annotations


class TFBrokerError(Exception):
    """Base of every error that can be sent to a client."""

    http_status = 500
    grpc_code = "INTERNAL"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class RequestError(TFBrokerError):
    """The request itself is wrong."""

    http_status = 400
    grpc_code = "INVALID_ARGUMENT"


class InvalidArgument(RequestError):
    http_status = 400
    grpc_code = "INVALID_ARGUMENT"


class NotFound(RequestError):
    http_status = 404
    grpc_code = "NOT_FOUND"


class PayloadTooLarge(RequestError):
    http_status = 413
    grpc_code = "RESOURCE_EXHAUSTED"


class Cancelled(RequestError):
    http_status = 499
    grpc_code = "CANCELLED"


class ServiceError(TFBrokerError):
    """The request was fine; the service could not serve it now."""

    http_status = 500
    grpc_code = "INTERNAL"


class Unavailable(ServiceError):
    http_status = 503
    grpc_code = "UNAVAILABLE"


class DeadlineExceeded(ServiceError):
    http_status = 504
    grpc_code = "DEADLINE_EXCEEDED"

    def __init__(self, message: str = "Deadline Exceeded") -> None:  # TF Serving's (gRPC's) words
        super().__init__(message)


class Internal(ServiceError):
    http_status = 500
    grpc_code = "INTERNAL"


# TF Serving's words (json_tensor.cc) for one unnamed value sent to a signature of several
# inputs: the broker says the first; the REST frontend, for a request in the columnar form, the second.
PLAIN_INSTANCES = ("instances is a plain list, but expecting list of objects as multiple input tensors required "
                   "as per tensorinfo_map")
PLAIN_INPUTS = ("inputs is a plain value/list, but expecting an object as multiple input tensors required as per "
                "tensorinfo_map")


class ProtocolError(ValueError):
    """A peer sent frames that do not follow tfbroker/wire/protocol.py. Never sent to clients as is."""


_BY_CODE: dict[int, type[TFBrokerError]] = {
    cls.http_status: cls for cls in (InvalidArgument, NotFound, PayloadTooLarge, Cancelled, Unavailable, DeadlineExceeded,
                                      Internal)
}


# An answer's gRPC code by its HTTP status, for figures kept by status (metrics).
GRPC_CODES: dict[int, str] = {200: "OK", **{cls.http_status: cls.grpc_code for cls in _BY_CODE.values()}}


def from_code(code: int, message: str) -> TFBrokerError:
    """The exception for a wire error code (an HTTP status); unknown codes become Internal."""
    return _BY_CODE.get(code, Internal)(message)


class ConfigError(ValueError):
    """A flag, configuration file, key or install that cannot be used: the process exits with
    EXIT_CONFIG_ERROR and the reason, since a restart will not help. Its own class, so that a
    ValueError from a bug never reads as a bad flag."""
