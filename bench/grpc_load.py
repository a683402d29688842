"""Closed-loop gRPC load on TF Serving's PredictionService/Predict, the request serialized
once (a client's protobuf work is not what is measured).

``h2load`` (nghttp2's HTTP/2 load generator, in C, from Debian's nghttp2-client) sends the
gRPC frames when it is installed: it takes little of the CPU it measures. Without it,
``python -m bench.grpc_load TARGET MODEL ROWS WIDTH CONCURRENCY SECONDS ENCODING`` runs
asyncio loops in this process and prints JSON (requests, duration_s, errors, p50_ms, p99_ms,
load_cpu_s); ENCODING is ``content`` (tensor_content) or ``typed`` (float_val). No
TensorFlow: our own messages (frontend/grpc_messages.py).
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


def oip_request_bytes(model: str, rows: int, width: int) -> bytes:
    """The Open Inference Protocol's ModelInfer as tritonclient sends it: raw_input_contents."""
    x = np.random.default_rng(5).standard_normal((rows, width)).astype(np.float32)
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    return bytes(request.SerializeToString())


OIP_METHOD = "/inference.GRPCInferenceService/ModelInfer"


def h2load(host: str, port: int, body: bytes, concurrency: int, seconds: float,
           method: str = METHOD) -> dict[str, float]:
    """h2load's closed loop: ``concurrency`` streams over up to 16 connections (so both
    frontends, which share the port, take connections), gRPC's length-prefixed message as the
    body. h2load sees HTTP status only: a gRPC error (HTTP 200 with grpc-status) counts as an
    answer, so the caller checks answers itself."""
    import os
    import resource
    import shutil
    import struct
    import subprocess
    import tempfile

    binary = shutil.which("h2load")
    if binary is None:
        raise FileNotFoundError("h2load (apt-get install nghttp2-client)")
    connections = min(concurrency, 16)
    streams = max(1, concurrency // connections)
    with tempfile.TemporaryDirectory() as tmp:
        data, log = os.path.join(tmp, "body"), os.path.join(tmp, "log")
        with open(data, "wb") as fh:
            fh.write(struct.pack(">BI", 0, len(body)) + body)
        usage0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        result = subprocess.run(
            [binary, "-c", str(connections), "-m", str(streams), "-D", str(max(1, round(seconds))), "-d", data,
             "-H", "content-type: application/grpc", "-H", "te: trailers", "--log-file", log,
             f"http://{host}:{port}{method}"], capture_output=True, text=True, timeout=seconds + 60)
        usage1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        if result.returncode != 0:
            raise RuntimeError(f"h2load failed: {result.stderr[-500:]}")
        durations = []
        failed = 0
        with open(log) as fh:
            for line in fh:
                _, status, micros = line.split()
                if status == "200":
                    durations.append(int(micros) / 1000)
                else:
                    failed += 1
    return {"requests": len(durations), "duration_s": float(max(1, round(seconds))), "errors": failed,
            "p50_ms": float(np.percentile(durations, 50)) if durations else 0.0,
            "p99_ms": float(np.percentile(durations, 99)) if durations else 0.0,
            "load_cpu_s": (usage1.ru_utime + usage1.ru_stime) - (usage0.ru_utime + usage0.ru_stime)}


def main() -> None:
    target, model, rows, width, concurrency, seconds, encoding = sys.argv[1:8]
    body = request_bytes(model, int(rows), int(width), encoding)
    print(json.dumps(asyncio.run(run(target, body, int(concurrency), float(seconds)))))


if __name__ == "__main__":
    main()
