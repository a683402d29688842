"""LitServe, a peer a user would pick for a Python stack: bench's mlp behind its batching.

``BENCH_MODEL_DIR=... python -m bench.litserve_app --port 18501``: one TensorFlow worker
process (``workers_per_device=1``), batches of up to 64 requests waiting at most 2 ms (as
bench/mosec_app.py), 2 API server processes (as our 2 frontends), route
/v1/models/mlp:predict, the same JSON in and out (TF Serving's ``instances`` and
``predictions``), decoded into float32 arrays in the API servers.
"""

import argparse
import os
from typing import Any

import numpy as np

import litserve as ls

MAX_BATCH_SIZE = 64
BATCH_TIMEOUT_S = 0.002


class Mlp(ls.LitAPI):
    def setup(self, device: str) -> None:
        import tensorflow as tf  # in the worker process only

        self._tf = tf
        self._fn = tf.saved_model.load(os.environ["BENCH_MODEL_DIR"]).signatures["serving_default"]
        self._fn(x=tf.zeros([1, 256]))  # warm up

    def decode_request(self, request: dict) -> np.ndarray:  # type: ignore[type-arg]  # (LitServe reads the annotation: a JSON body)
        return np.asarray(request["instances"], dtype=np.float32)

    def batch(self, inputs: list[np.ndarray]) -> Any:
        return inputs  # kept as a list: unbatch needs each request's rows

    def predict(self, xs: list[np.ndarray]) -> list[np.ndarray]:
        y = self._fn(x=self._tf.constant(np.concatenate(xs)))["y"].numpy()
        return np.split(y, np.cumsum([len(x) for x in xs])[:-1])

    def unbatch(self, output: list[np.ndarray]) -> list[np.ndarray]:
        return output

    def encode_response(self, output: np.ndarray) -> dict[str, Any]:
        return {"predictions": output.tolist()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=18501)
    parser.add_argument("--api_servers", type=int, default=2)
    args = parser.parse_args()
    api = Mlp(max_batch_size=MAX_BATCH_SIZE, batch_timeout=BATCH_TIMEOUT_S, api_path="/v1/models/mlp:predict")
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=1)
    server.run(host="127.0.0.1", port=args.port, num_api_servers=args.api_servers, log_level="warning",
               generate_client_file=False)


if __name__ == "__main__":
    main()
