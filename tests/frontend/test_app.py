"""Routes of the REST API over an in-memory client of the same shape as AsyncClient."""

from __future__ import annotations

from typing import Any

import asyncio

import httpx
import numpy as np
import pytest

from broker.errors import DeadlineExceeded, NotFound, Unavailable
from frontend.app import create_app
from frontend.client import Prediction


class FakeClient:
    """Answers like a broker serving ``m`` version 3 (y = x + 1); records the calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.error: Exception | None = None

    async def predict(self, model: str, inputs: dict[str, np.ndarray], **kwargs: Any) -> Prediction:
        self.calls.append(("predict", {"model": model, "inputs": inputs, **kwargs}))
        if self.error:
            raise self.error
        if model != "m":
            raise NotFound(f"Servable not found for request: Latest({model})")
        (value,) = inputs.values()
        return Prediction({"y": value + 1}, model, 3)

    async def status(self, model: str, **kwargs: Any) -> dict[str, Any]:
        self.calls.append(("status", {"model": model, **kwargs}))
        return {"model_version_status": [{"version": "3", "state": "AVAILABLE",
                                          "status": {"error_code": "OK", "error_message": ""}}]}

    async def metadata(self, model: str, **kwargs: Any) -> dict[str, Any]:
        self.calls.append(("metadata", {"model": model, **kwargs}))
        return {"version": 3, "signature_def": {"signature_def": {}}}

    def close(self) -> None:
        pass


@pytest.fixture()
def fake() -> FakeClient:
    return FakeClient()


class SyncASGI:
    """Plain HTTP calls into the app in memory (no lifespan: it would retitle pytest)."""

    def __init__(self, fake: FakeClient) -> None:
        self.app = create_app(fake, timeout_s=5.0)  # type: ignore[arg-type]

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        async def call() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                return await client.request(method, path, **kwargs)

        return asyncio.run(call())

    def get(self, path: str) -> httpx.Response:
        return self.request("GET", path)

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", path, **kwargs)


@pytest.fixture()
def http(fake: FakeClient) -> SyncASGI:
    return SyncASGI(fake)


def test_predict_routes_pin_versions_and_labels(http: SyncASGI, fake: FakeClient) -> None:
    response = http.post("/v1/models/m:predict", json={"instances": [1, 2]})
    assert response.json() == {"predictions": [2, 3]}
    assert response.headers["x-model-version"] == "3"
    http.post("/v1/models/m/versions/7:predict", json={"instances": [1]})
    http.post("/v1/models/m/labels/canary:predict", json={"instances": [1], "signature_name": "s"})
    kwargs = [c[1] for c in fake.calls]
    assert (kwargs[1]["version"], kwargs[1]["label"]) == (7, None)
    assert (kwargs[2]["version"], kwargs[2]["label"], kwargs[2]["signature_name"]) == (None, "canary", "s")
    assert all(k["timeout_s"] == 5.0 for k in kwargs)


def test_status_and_metadata(http: SyncASGI, fake: FakeClient) -> None:
    assert http.get("/v1/models/m").json()["model_version_status"][0]["version"] == "3"
    assert http.get("/v1/models/m/versions/3").status_code == 200
    assert http.get("/v1/models/m/labels/stable/metadata").json() == {
        "model_spec": {"name": "m", "signature_name": "", "version": "3"},
        "metadata": {"signature_def": {"signature_def": {}}}}
    assert [c[0] for c in fake.calls] == ["status", "status", "metadata"]
    assert fake.calls[2][1]["label"] == "stable"


@pytest.mark.parametrize(("error", "status"), [
    (Unavailable("The batch scheduling queue to which this task was submitted is full"), 503),
    (DeadlineExceeded("late"), 504),
])
def test_service_errors_map_to_their_status(http: SyncASGI, fake: FakeClient, error: Exception,
                                            status: int) -> None:
    fake.error = error
    response = http.post("/v1/models/m:predict", json={"instances": [1]})
    assert response.status_code == status
    assert response.json() == {"error": str(error)}


@pytest.mark.parametrize(("method", "path", "status"), [
    ("POST", "/v1/models/m:frobnicate", 404),
    ("GET", "/v1/models/m:predict", 404),
    ("POST", "/v1/models/m/versions/x:predict", 404),
    ("POST", "/v1/models/m:classify", 501),
    ("GET", "/v2/models/m", 404),
    ("PUT", "/v1/models/m", 405),
])
def test_malformed_urls(http: SyncASGI, method: str, path: str, status: int) -> None:
    response = http.request(method, path, json={"instances": [1]})
    assert response.status_code == status
    assert "error" in response.json()
