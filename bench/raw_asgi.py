"""The floor under our frontend: a raw ASGI app doing the same JSON work as a frontend's
predict (parse TF Serving's JSON into arrays, encode the tensor frames, format an answer)
with no broker and no model. ``gunicorn -k uvicorn_worker.UvicornWorker -w 2 bench.raw_asgi:app``.

What a frontend costs above this, per request, is ours to remove (issue 12); what this costs
is uvicorn's HTTP and ASGI plus the JSON.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tfbroker.runtime.settings import RequestLimits
from tfbroker.wire.tensors import encode_tensors
from frontend.json_tensor import format_predictions, parse_predict_body

LIMITS = RequestLimits()
ANSWER = {"y": np.zeros((1, 16), np.float32)}
HEADERS = [(b"content-type", b"application/json")]


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    inputs, _, row_format = parse_predict_body(b"".join(chunks), LIMITS)
    encode_tensors(inputs)  # the frames a frontend would send
    body = format_predictions(ANSWER, row_format)
    await send({"type": "http.response.start", "status": 200,
                "headers": [*HEADERS, (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
