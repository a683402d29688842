"""Your own FastAPI app calling the shared model, with the asyncio client.

    TFBROKER_ADDRESS=ipc:///run/tfbroker/frontend.sock MODEL_NAME=mlp \\
        gunicorn -w 4 -k uvicorn_worker.UvicornWorker -b 127.0.0.1:8000 examples.fastapi_app:app
    curl -d '{"features": {"f0": 1.5, "f3": -2}}' http://127.0.0.1:8000/score
"""

from __future__ import annotations

import os
from typing import Any

from fastapi import FastAPI, HTTPException, Request

from tfbroker.wire.errors import TFBrokerError
from examples.processing import postprocess, preprocess
from tfbroker import AsyncClient

MODEL = os.environ.get("MODEL_NAME", "mlp")

app = FastAPI()
client = AsyncClient(os.environ.get("TFBROKER_ADDRESS"), timeout_s=10.0)


@app.post("/score")
async def score(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        body = None
    try:
        inputs = preprocess(body)
        result = await client.predict(MODEL, inputs)
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from exc
    except TFBrokerError as exc:
        raise HTTPException(exc.http_status, exc.message) from exc
    return postprocess(result.outputs, result.version)
