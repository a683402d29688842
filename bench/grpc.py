"""``python -m bench.grpc``: every way into one tfbroker (2 frontends, bench's mlp), interleaved
rounds: TF Serving's REST and gRPC APIs and the Open Inference Protocol's (REST with JSON, REST
with binary tensors as tritonclient sends them, gRPC with raw_input_contents as tritonclient
sends them): req/s, p50, p99 and the frontends' and broker's CPU per request at c=1, 64 and
256, one row and 32 rows a request (float32 written at full precision in JSON; tensor_content
and float_val in TF Serving's gRPC). wrk drives REST, h2load drives gRPC (both in C;
bench.grpc_load's Python loop without h2load, TF Serving's API only), their own CPU reported beside."""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.grpc_load import OIP_METHOD, h2load, oip_request_bytes, request_bytes
from bench.load import wrk
from bench.run import PORT, log
from bench.run import _broker_stats as broker_stats
from bench.servers import ROOT, cpu_by_role, tfbroker_server

GRPC_PORT = 18500
WIDTH = 256


APIS = ("REST", "gRPC content", "gRPC typed", "OIP JSON", "OIP binary", "OIP gRPC raw")


def oip_bodies(x: np.ndarray) -> tuple[str, bytes, dict[str, str]]:
    """The protocol's JSON body, and its binary one with the header that announces it."""
    tensor = {"name": "x", "shape": list(x.shape), "datatype": "FP32"}
    text = json.dumps({"inputs": [{**tensor, "data": x.reshape(-1).tolist()}]})
    head = json.dumps({"inputs": [{**tensor, "parameters": {"binary_data_size": x.nbytes}}],
                       "outputs": [{"name": "y", "parameters": {"binary_data": True}}]}).encode()
    return text, head + x.tobytes(), {"Inference-Header-Content-Length": str(len(head)),
                                      "Content-Type": "application/octet-stream"}


def grpc_load(rows: int, concurrency: int, seconds: float, encoding: str) -> dict[str, Any]:
    if encoding == "raw":
        return h2load("127.0.0.1", GRPC_PORT, oip_request_bytes("mlp", rows, WIDTH), concurrency, seconds,
                      OIP_METHOD)
    if shutil.which("h2load"):
        return h2load("127.0.0.1", GRPC_PORT, request_bytes("mlp", rows, WIDTH, encoding), concurrency, seconds)
    result = subprocess.run([sys.executable, "-m", "bench.grpc_load", f"127.0.0.1:{GRPC_PORT}", "mlp", str(rows),
                             str(WIDTH), str(concurrency), str(seconds), encoding], cwd=ROOT, capture_output=True,
                            text=True, timeout=seconds + 120)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-2000:])
    answer: dict[str, Any] = json.loads(result.stdout)
    return answer


def check_grpc() -> None:
    """The answers h2load cannot read: each encoding answers OK, with the model's rows."""
    import grpc

    from frontend import grpc_messages as pb

    with grpc.insecure_channel(f"127.0.0.1:{GRPC_PORT}") as channel:
        call = channel.unary_unary("/tensorflow.serving.PredictionService/Predict",
                                   response_deserializer=pb.PredictResponse.FromString)
        for encoding in ("content", "typed"):
            for rows in (1, 32):
                answer = call(request_bytes("mlp", rows, WIDTH, encoding), timeout=30)
                assert answer.outputs["y"].tensor_shape.dim[0].size == rows, answer
        infer = channel.unary_unary(OIP_METHOD, response_deserializer=pb.ModelInferResponse.FromString)
        for rows in (1, 32):
            answer = infer(oip_request_bytes("mlp", rows, WIDTH), timeout=30)
            assert list(answer.outputs[0].shape)[0] == rows and answer.raw_output_contents, answer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.grpc", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--duration_s", type=float, default=4.0)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="tfb-grpc-"))
    subprocess.run([sys.executable, "-c", f"from workers.demo_models import save_mlp; save_mlp({str(work / 'mlp' / '1')!r})"],
                   cwd=ROOT, check=True, capture_output=True)
    server = tfbroker_server(str(work / "mlp"), 2, PORT, tempfile.mkdtemp(prefix="tfb-"), [f"--port={GRPC_PORT}"])
    server.start()
    rng = np.random.default_rng(5)
    inputs = {rows: rng.standard_normal((rows, WIDTH)).astype(np.float32) for rows in (1, 32)}
    bodies = {rows: json.dumps({"instances": x.tolist()}) for rows, x in inputs.items()}
    oip = {rows: oip_bodies(x) for rows, x in inputs.items()}
    oip_url = server.url.replace("/v1/models/mlp:predict", "/v2/models/mlp/infer")
    cells: dict[tuple[str, int, int], list[dict[str, Any]]] = {}
    try:
        check_grpc()
        for answer in (httpx.post(oip_url, content=oip[32][0], timeout=30),
                       httpx.post(oip_url, content=oip[32][1], headers=oip[32][2], timeout=30)):
            assert answer.status_code == 200, answer.text[:300]
        wrk(server.url, bodies[1], 16, 2)
        grpc_load(1, 16, 2, "content")
        for round_ in range(args.rounds):
            for rows in (1, 32):
                for concurrency in (1, 64, 256):
                    for api in APIS:
                        before = cpu_by_role(server.process.pid)  # type: ignore[union-attr]
                        rejected = broker_stats(server)["rejected"]
                        if api == "REST":
                            result = wrk(server.url, bodies[rows], concurrency, args.duration_s)
                        elif api == "OIP JSON":
                            result = wrk(oip_url, oip[rows][0], concurrency, args.duration_s)
                        elif api == "OIP binary":
                            result = wrk(oip_url, oip[rows][1], concurrency, args.duration_s, oip[rows][2])
                        else:
                            result = grpc_load(rows, concurrency, args.duration_s, api.split()[1])
                        after = cpu_by_role(server.process.pid)  # type: ignore[union-attr]
                        # Refused answers (503 / UNAVAILABLE: the queue bound), which h2load counts as answered.
                        result["rejected"] = broker_stats(server)["rejected"] - rejected
                        requests = max(1, result["requests"])
                        result["frontend_ms"] = (after.get("frontends", 0) - before.get("frontends", 0)) * 1000 / requests
                        result["broker_ms"] = (after.get("broker", 0) - before.get("broker", 0)) * 1000 / requests
                        result["load_ms"] = result["load_cpu_s"] * 1000 / requests
                        cells.setdefault((api, rows, concurrency), []).append(result)
                        log(f"round {round_ + 1}: {api} rows={rows} c={concurrency}: "
                            f"{result['requests'] / result['duration_s']:.0f} req/s, p50 {result['p50_ms']:.2f} ms, "
                            f"p99 {result['p99_ms']:.2f} ms, frontends {result['frontend_ms']:.3f} ms/req, "
                            f"errors {result['errors']}")
    finally:
        server.stop()
    print("\n| API | rows | c | req/s (median) | p50 ms | p99 ms | frontends CPU ms/req | broker CPU ms/req "
          "| load generator CPU ms/req | errors | refused (broker) |\n"
          "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for (api, rows, concurrency), runs in cells.items():
        def med(key: str, runs: list[dict[str, Any]] = runs) -> float:
            return statistics.median(r[key] for r in runs)
        rate = statistics.median(r["requests"] / r["duration_s"] for r in runs)
        print(f"| {api} | {rows} | {concurrency} | {rate:.0f} | {med('p50_ms'):.2f} | {med('p99_ms'):.2f} "
              f"| {med('frontend_ms'):.3f} | {med('broker_ms'):.3f} | {med('load_ms'):.3f} "
              f"| {sum(r['errors'] for r in runs)} | {sum(r['rejected'] for r in runs)} |")


if __name__ == "__main__":
    main()
