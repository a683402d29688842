"""What an HTTP answer of the frontend's is, for every REST API (TF Serving's, the Open Inference
Protocol's): a status, a body and headers, made whole before it is sent; an error is JSON
``{"error": "…"}`` with the status of its class (tfbroker/wire/errors.py)."""

from __future__ import annotations

import orjson

from tfbroker.wire.errors import TFBrokerError

Answer = tuple[int, bytes, list[tuple[bytes, bytes]]]  # status, body, headers beside content-type and -length
JSON = (b"content-type", b"application/json")
RETRY_AFTER_S = "1"  # what a 503 (queue full, model loading, worker restarting) tells callers


def error_answer(error: TFBrokerError) -> Answer:
    headers = [(b"retry-after", RETRY_AFTER_S.encode())] if error.http_status == 503 else []
    return error.http_status, orjson.dumps({"error": error.message}), headers
