"""Ray Serve, a peer a user would pick for a Python stack: bench's mlp behind ``@serve.batch``.

``BENCH_MODEL_DIR=... python -m bench.rayserve_app --port 18501``: a local Ray with 2 CPUs
and no dashboard, one replica of the model (one TensorFlow copy) with Ray Serve's batching
(up to 64 requests, waiting at most 2 ms, as bench/mosec_app.py), its HTTP proxy on
127.0.0.1, route /v1/models/mlp:predict, the same JSON in and out (orjson, as our frontends).
Runs until SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
from typing import Any

import numpy as np
import orjson

MAX_BATCH_SIZE = 64
BATCH_WAIT_S = 0.002


def deployment() -> Any:
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import Response

    @serve.deployment(num_replicas=1, max_ongoing_requests=1024, ray_actor_options={"num_cpus": 1})
    class Mlp:
        def __init__(self) -> None:
            import tensorflow as tf

            self._tf = tf
            self._fn = tf.saved_model.load(os.environ["BENCH_MODEL_DIR"]).signatures["serving_default"]
            self._fn(x=tf.zeros([1, 256]))  # warm up

        @serve.batch(max_batch_size=MAX_BATCH_SIZE, batch_wait_timeout_s=BATCH_WAIT_S)
        async def run(self, xs: list[np.ndarray]) -> list[np.ndarray]:
            y = self._fn(x=self._tf.constant(np.concatenate(xs)))["y"].numpy()
            return np.split(y, np.cumsum([len(x) for x in xs])[:-1])

        async def __call__(self, request: Request) -> Response:
            x = np.asarray(orjson.loads(await request.body())["instances"], dtype=np.float32)
            y = await self.run(x)
            return Response(orjson.dumps({"predictions": y}, option=orjson.OPT_SERIALIZE_NUMPY),
                            media_type="application/json")

    return Mlp


def main() -> None:
    import ray
    from ray import serve

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=18501)
    args = parser.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    serve.run(deployment().bind(), route_prefix="/v1/models/mlp:predict", blocking=False)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
