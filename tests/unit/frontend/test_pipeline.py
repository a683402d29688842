"""The frontend's one pipeline: one capacity count across every API, one error table, health
that follows the truth. Over an in-memory client of AsyncClient's shape; the gRPC servicers
are called as grpc.aio calls them."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import httpx
import numpy as np
import pytest

from frontend import grpc_messages as pb
from frontend.app import create_app
from frontend.grpc_api import Services
from frontend.grpc_handlers import status_code
from frontend.grpc_server import TruthfulHealth
from grpc_health.v1 import health_pb2
from frontend.oip_grpc import InferenceService
from frontend.pipeline import Pipeline
from tfbroker.client import Prediction
from tfbroker.runtime.settings import FrontendConfig, RequestLimits
from tfbroker.wire import errors, protocol

ERROR_CLASSES = [errors.InvalidArgument, errors.NotFound, errors.PayloadTooLarge, errors.Cancelled,
                 errors.Unavailable, errors.DeadlineExceeded, errors.Internal]


class HeldClient:
    """Every predict waits until ``release`` is set; health says what ``ready`` says."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.waiting = 0
        self.error: Exception | None = None
        self.ready: protocol.HealthReply | Exception = protocol.HealthReply(id=1, ready=True)

    async def predict(self, model: str, inputs: dict[str, Any], **kwargs: Any) -> Prediction:
        if self.error is not None:
            raise self.error
        self.waiting += 1
        await self.release.wait()
        return Prediction({"y": np.ones((1, 1), np.float32)}, model, 1)

    async def health(self, model: str | None = None, **kwargs: Any) -> protocol.HealthReply:
        if isinstance(self.ready, Exception):
            raise self.ready
        return self.ready

    def close(self) -> None:
        pass


class Context:
    """What a grpc.aio servicer context gives our servicers."""

    def __init__(self) -> None:
        self.code: grpc.StatusCode | None = None

    def time_remaining(self) -> float | None:
        return None

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.code = code
        raise grpc.aio.AbortError()


def rest_request(app: Any, path: str, body: Any) -> Any:
    transport = httpx.ASGITransport(app=app)
    client = httpx.AsyncClient(transport=transport, base_url="http://test")
    return client.post(path, json=body)


def oip_request() -> Any:
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 1]).contents.fp32_contents.append(1.0)
    return request


def tfs_request() -> Any:
    request = pb.PredictRequest()
    request.model_spec.name = "m"
    tensor = request.inputs["x"]
    tensor.dtype = pb.DATA_TYPES["DT_FLOAT"]
    tensor.tensor_shape.dim.add(size=1)
    tensor.float_val.append(1.0)
    return request


def test_one_capacity_count_across_every_api() -> None:
    async def run() -> None:
        client = HeldClient()
        config = FrontendConfig(limits=RequestLimits(max_concurrent_predictions=3))
        app = create_app(client, config=config)  # type: ignore[arg-type]
        pipeline: Pipeline = app.pipeline  # type: ignore[attr-defined]
        tfs, oip = Services(pipeline), InferenceService(pipeline)
        held = [asyncio.ensure_future(rest_request(app, "/v1/models/m:predict", {"instances": [[1.0]]})),
                asyncio.ensure_future(tfs.predict(tfs_request(), Context())),  # type: ignore[arg-type]
                asyncio.ensure_future(rest_request(app, "/v2/models/m/infer", {"inputs": [
                    {"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [1.0]}]}))]
        while client.waiting < 3:
            await asyncio.sleep(0.001)
        assert pipeline.waiting == 3
        # The fourth, from any API, is refused at once.
        with pytest.raises(errors.Unavailable, match="3 predictions waiting"):
            await oip.model_infer(oip_request(), Context())  # type: ignore[arg-type]
        refused = await rest_request(app, "/v1/models/m:predict", {"instances": [[1.0]]})
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        client.release.set()
        rest, grpc_answer, oip_answer = await asyncio.gather(*held)
        assert rest.status_code == 200 and oip_answer.status_code == 200
        assert grpc_answer.model_spec.version.value == 1
        assert pipeline.waiting == 0

    asyncio.run(run())


def test_one_error_table_for_every_api() -> None:
    """Each error class's HTTP status on REST (both protocols) and its gRPC code on gRPC (both
    protocols), from the class itself."""
    for cls in ERROR_CLASSES:
        assert getattr(grpc.StatusCode, cls.grpc_code) is status_code(cls("x"))
        assert errors.GRPC_CODES[cls.http_status] == cls.grpc_code

    async def run() -> None:
        client = HeldClient()
        app = create_app(client, config=FrontendConfig())  # type: ignore[arg-type]
        pipeline: Pipeline = app.pipeline  # type: ignore[attr-defined]
        from frontend.grpc_handlers import unary

        for cls in ERROR_CLASSES:
            client.error = cls("the reason")
            for path, body in (("/v1/models/m:predict", {"instances": [[1.0]]}),
                               ("/v2/models/m/infer", {"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP32",
                                                                   "data": [1.0]}]})):
                answer = await rest_request(app, path, body)
                assert (answer.status_code, answer.json()) == (cls.http_status, {"error": "the reason"}), path
            for method, request in ((Services(pipeline).predict, tfs_request()),
                                    (InferenceService(pipeline).model_infer, oip_request())):
                handler = unary(method, type(request))
                context = Context()
                with pytest.raises(grpc.aio.AbortError):
                    await handler.unary_unary(request, context)
                assert context.code is getattr(grpc.StatusCode, cls.grpc_code)

    asyncio.run(run())


def test_health_follows_the_truth() -> None:
    async def run() -> None:
        client = HeldClient()
        app = create_app(client, config=FrontendConfig())  # type: ignore[arg-type]
        pipeline: Pipeline = app.pipeline  # type: ignore[attr-defined]
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            health = TruthfulHealth(pipeline)

            async def checked(service: str) -> Any:
                return (await health.Check(health_pb2.HealthCheckRequest(service=service), Context())).status

            # Before the broker has its initial models.
            client.ready = protocol.HealthReply(id=1, ready=False, reason="version 1 of m is LOADING")
            assert await checked("PredictionService") == health_pb2.HealthCheckResponse.NOT_SERVING
            answer = await http.get("/v2/health/ready")
            assert answer.status_code == 503 and "LOADING" in answer.json()["error"]
            assert (await InferenceService(pipeline).server_ready(None, Context())).ready is False
            # The broker is away: not ready, and why.
            client.ready = errors.Unavailable("the broker at ipc://x stopped answering")
            assert (await http.get("/v2/health/ready")).json()["error"].endswith("stopped answering")
            # Serving.
            client.ready = protocol.HealthReply(id=1, ready=True)
            assert (await http.get("/v2/health/ready")).json() == {"ready": True}
            assert (await http.get("/v2/health/live")).json() == {"live": True}
            assert (await InferenceService(pipeline).server_ready(None, Context())).ready is True
            for service in ("", "ModelService", "PredictionService", "tensorflow.serving.PredictionService",
                            "inference.GRPCInferenceService"):
                assert await checked(service) == health_pb2.HealthCheckResponse.SERVING, service
            # Stopping: not ready whatever the broker says; live still.
            pipeline.stopping = True
            answer = await http.get("/v2/health/ready")
            assert answer.status_code == 503 and answer.json()["error"] == "this frontend is stopping"
            assert (await http.get("/v2/health/live")).status_code == 200
            assert await checked("ModelService") == health_pb2.HealthCheckResponse.NOT_SERVING

    asyncio.run(run())
