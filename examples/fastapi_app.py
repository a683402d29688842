"""Your own FastAPI app calling the shared model, with the asyncio client.

    pip install -e '.[examples]'        # Flask, FastAPI, gunicorn
    python -m broker &                  # the demo: its mlp is the default MODEL_NAME
    gunicorn -w 4 -k uvicorn_worker.UvicornWorker -b 127.0.0.1:8000 examples.fastapi_app:app
    curl -d '{"features": {"f0": 1.5, "f3": -2}}' http://127.0.0.1:8000/score

TFBROKER_ADDRESS names another broker (default: the one on this host's port 8501), MODEL_NAME
another model that takes x float32 [batch, width].
"""

from __future__ import annotations

import os
from typing import Any

from fastapi import FastAPI, HTTPException, Request

from tfbroker.wire.errors import TFBrokerError
from examples.processing import input_width, postprocess, preprocess
from tfbroker import AsyncClient

MODEL = os.environ.get("MODEL_NAME", "mlp")

app = FastAPI()
client = AsyncClient(os.environ.get("TFBROKER_ADDRESS"), timeout_s=10.0)
width: list[int] = []  # the model's input width, asked once per worker


async def model_width() -> int:
    if not width:
        width.append(input_width(await client.metadata(MODEL)))
    return width[0]


@app.post("/score")
async def score(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        body = None
    try:
        inputs = preprocess(body, await model_width())
        result = await client.predict(MODEL, inputs)
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from exc
    except TFBrokerError as exc:
        raise HTTPException(exc.http_status, exc.message) from exc
    return postprocess(result.outputs, result.version)
