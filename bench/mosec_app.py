"""The best peer a user would pick instead: mosec (a Rust HTTP front with dynamic batching in
front of Python workers), serving the same model with the same JSON.

``BENCH_MODEL_DIR=... python -m bench.mosec_app --port 18501 --address 127.0.0.1``: one
TensorFlow worker process, batches of up to 64 requests, 2 ms wait (mosec's recommended
online set-up), route /v1/models/mlp:predict. The JSON is decoded and encoded in the worker
with orjson, as our frontends and the naive app do; ``BENCH_MOSEC_JSON=default`` keeps
mosec's own (the standard library's json), as a first mosec deployment would.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import orjson
from mosec import Server, Worker

MAX_BATCH_SIZE = 64
MAX_WAIT_MS = 2


class Predict(Worker):
    """mosec's default JSON: the request body as Python lists, the answer via json.dumps."""

    def __init__(self) -> None:
        super().__init__()
        import tensorflow as tf  # in the worker process only

        self._tf = tf
        self._fn = tf.saved_model.load(os.environ["BENCH_MODEL_DIR"]).signatures["serving_default"]
        self._fn(x=tf.zeros([1, 256]))  # warm up

    def forward(self, data: list[Any]) -> list[Any]:
        xs = [np.asarray(d["instances"], dtype=np.float32) for d in data]
        y = self._fn(x=self._tf.constant(np.concatenate(xs)))["y"].numpy()
        return [{"predictions": part.tolist()} for part in np.split(y, np.cumsum([len(x) for x in xs])[:-1])]


class PredictOrjson(Predict):
    """orjson both ways and the arrays built in deserialize (per request, off the batch path)."""

    def deserialize(self, data: bytes) -> Any:
        return np.asarray(orjson.loads(data)["instances"], dtype=np.float32)

    def serialize(self, data: Any) -> bytes:
        return orjson.dumps({"predictions": data}, option=orjson.OPT_SERIALIZE_NUMPY)

    def forward(self, data: list[Any]) -> list[Any]:
        y = self._fn(x=self._tf.constant(np.concatenate(data)))["y"].numpy()
        return np.split(y, np.cumsum([len(x) for x in data])[:-1])


if __name__ == "__main__":
    server = Server()
    worker = Predict if os.environ.get("BENCH_MOSEC_JSON") == "default" else PredictOrjson
    server.append_worker(worker, num=1, max_batch_size=MAX_BATCH_SIZE, max_wait_time=MAX_WAIT_MS,
                         route="/v1/models/mlp:predict")
    server.run()
