"""``python -m bench.frontend_cost``: the frontend's Python per request, by API.

Runs the ASGI app in-process with an in-memory client (no HTTP parsing, no broker), 20,000
requests per case, three rounds: what our code costs between a parsed HTTP request and the
answer, for predict (bench's mlp row, one float) against classify and regress (one example).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import numpy as np

from frontend.app import create_app
from tfbroker.runtime.settings import FrontendConfig
from tfbroker import Prediction

# bench's mlp row as clients that dump numpy arrays write it: float32 values at full precision.
ROW = json.dumps({"instances": np.random.default_rng(1).standard_normal((1, 256)).astype(np.float32).tolist()})
CASES = {
    "predict, mlp row (256 floats)": ("/v1/models/m:predict", ROW.encode()),
    "predict, mlp row (256 short floats)": ("/v1/models/m:predict",
                                            b'{"instances": [[' + b",".join([b"0.5"] * 256) + b"]]}"),
    "predict, one float": ("/v1/models/m:predict", b'{"instances": [1.0]}'),
    "classify, one example": ("/v1/models/m:classify", b'{"signature_name": "c", "examples": [{"x": 1.0}]}'),
    "regress, one example": ("/v1/models/m:regress", b'{"signature_name": "r", "examples": [{"x": 1.0}]}'),
}


class InMemoryClient:
    async def predict(self, model: str, inputs: Any, **kwargs: Any) -> Prediction:
        return Prediction({"y": np.zeros((1, 16), np.float32)}, model, 1)

    async def classify(self, model: str, examples: list[bytes], **kwargs: Any) -> Prediction:
        return Prediction({"scores": np.full((len(examples), 1), 2.5, np.float32)}, model, 1)

    async def regress(self, model: str, examples: list[bytes], **kwargs: Any) -> Prediction:
        return Prediction({"outputs": np.full((len(examples), 1), 2.5, np.float32)}, model, 1)

    def close(self) -> None:
        pass


async def per_request_us(app: Any, path: str, body: bytes, count: int = 20_000) -> float:
    scope = {"type": "http", "method": "POST", "path": path, "raw_path": path.encode(),
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}

    async def send(message: Any) -> None:
        pass

    started = time.perf_counter()
    for _ in range(count):
        delivered = False

        async def receive() -> Any:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.sleep(3600)

        await app(scope, receive, send)
    return (time.perf_counter() - started) / count * 1e6


async def measure() -> None:
    app = create_app(InMemoryClient(), config=FrontendConfig(rest_api_timeout_in_ms=5000))  # type: ignore[arg-type]
    for _ in range(3):
        print(" | ".join([f"{name}: {await per_request_us(app, *case):.1f} µs" for name, case in CASES.items()]))


if __name__ == "__main__":
    asyncio.run(measure())
