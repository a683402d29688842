"""Closed-loop gRPC load: TF Serving's PredictionService/Predict from asyncio loops in this
process, the request serialized once (a client's protobuf work is not what is measured).

``python -m bench.grpc_load TARGET MODEL ROWS WIDTH CONCURRENCY SECONDS ENCODING`` prints JSON
(requests, duration_s, errors, p50_ms, p99_ms, load_cpu_s); ENCODING is ``content``
(tensor_content) or ``typed`` (float_val). No TensorFlow: our own messages (frontend/grpc_messages.py).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import grpc
import numpy as np

from frontend import grpc_messages as pb

METHOD = "/tensorflow.serving.PredictionService/Predict"


def request_bytes(model: str, rows: int, width: int, encoding: str) -> bytes:
    x = np.random.default_rng(5).standard_normal((rows, width)).astype(np.float32)
    request = pb.PredictRequest()
    request.model_spec.name = model
    tensor = request.inputs["x"]
    tensor.dtype = pb.DATA_TYPES["DT_FLOAT"]
    for size in x.shape:
        tensor.tensor_shape.dim.add(size=size)
    if encoding == "content":
        tensor.tensor_content = x.tobytes()
    else:
        tensor.float_val.extend(x.reshape(-1).tolist())
    return bytes(request.SerializeToString())


async def run(target: str, body: bytes, concurrency: int, seconds: float) -> dict[str, float]:
    latencies: list[float] = []
    errors = 0
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary(METHOD, request_serializer=None, response_deserializer=None)
        await call(body, timeout=30)  # connect
        stop = time.monotonic() + seconds

        async def loop() -> None:
            nonlocal errors
            while time.monotonic() < stop:
                started = time.perf_counter()
                try:
                    await call(body, timeout=10)
                except grpc.aio.AioRpcError:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - started)

        cpu0, wall0 = time.process_time(), time.monotonic()
        await asyncio.gather(*[loop() for _ in range(concurrency)])
        wall, cpu = time.monotonic() - wall0, time.process_time() - cpu0
    return {"requests": len(latencies), "duration_s": wall, "errors": errors,
            "p50_ms": float(np.percentile(latencies, 50) * 1000) if latencies else 0.0,
            "p99_ms": float(np.percentile(latencies, 99) * 1000) if latencies else 0.0, "load_cpu_s": cpu}


def main() -> None:
    target, model, rows, width, concurrency, seconds, encoding = sys.argv[1:8]
    body = request_bytes(model, int(rows), int(width), encoding)
    print(json.dumps(asyncio.run(run(target, body, int(concurrency), float(seconds)))))


if __name__ == "__main__":
    main()
