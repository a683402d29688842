"""The baseline our users run today: every gunicorn worker loads the model and predicts each
request alone. ``BENCH_MODEL_DIR=... gunicorn -k uvicorn_worker.UvicornWorker -w 2 bench.naive_app:app``
"""

from __future__ import annotations

import os

import numpy as np
import orjson
import tensorflow as tf
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

_fn = tf.saved_model.load(os.environ["BENCH_MODEL_DIR"]).signatures["serving_default"]
_fn(x=tf.zeros([1, 256]))  # warm up


async def predict(request: Request) -> Response:
    body = orjson.loads(await request.body())
    x = np.asarray(body["instances"], dtype=np.float32)
    y = _fn(x=tf.constant(x))["y"].numpy()
    return Response(orjson.dumps({"predictions": y}, option=orjson.OPT_SERIALIZE_NUMPY),
                    media_type="application/json")


app = Starlette(routes=[Route("/v1/models/mlp:predict", predict, methods=["POST"])])
