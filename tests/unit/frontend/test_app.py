"""Routes of the REST API over an in-memory client of the same shape as AsyncClient."""

from __future__ import annotations

from typing import Any

import asyncio

import httpx
import numpy as np
import pytest

from tfbroker.wire.errors import DeadlineExceeded, NotFound, Unavailable
from frontend.app import create_app
from tfbroker.runtime.settings import FrontendConfig, RequestLimits
from tfbroker.client import Prediction


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

    async def classify(self, model: str, examples: list[bytes], **kwargs: Any) -> Prediction:
        self.calls.append(("classify", {"model": model, "examples": examples, **kwargs}))
        return Prediction({"classes": np.array([[b"a", b"b"]] * len(examples), dtype=object),
                           "scores": np.array([[0.1, 0.9]] * len(examples), np.float32)}, model, 3)

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
        self.app = create_app(fake, config=FrontendConfig(rest_api_timeout_in_ms=5000))  # type: ignore[arg-type]

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
    assert response.headers.get("retry-after") == ("1" if status == 503 else None)


@pytest.mark.parametrize(("method", "path", "status", "error"), [
    ("POST", "/v1/models/m:frobnicate", 400, "Malformed request: POST /v1/models/m:frobnicate"),
    ("GET", "/v1/models/m:predict", 400, "Malformed request: GET /v1/models/m:predict"),
    ("POST", "/v1/models/m/versions/x:predict", 400, "Malformed request: POST /v1/models/m/versions/x:predict"),
    ("PUT", "/v1/models/m", 400, "Malformed request: PUT /v1/models/m"),
    ("DELETE", "/v1/models/m:predict", 400, "Malformed request: DELETE /v1/models/m:predict"),
    ("GET", "/v1/models", 400, "Missing model name in request."),
    ("GET", "/v1/models/", 400, "Malformed request: GET /v1/models/"),
    ("GET", "/v1/", 400, "Malformed request: GET /v1/"),
    ("GET", "/v1/models/m/versions/99999999999999999999", 400,
     "Failed to convert version: 99999999999999999999 to numeric."),
    ("POST", "/v1/models/m/versions/99999999999999999999:predict", 400,
     "Failed to convert version: 99999999999999999999 to numeric."),
    ("POST", "/v1/models/m:classify", 400, "When method is classify, key 'examples' is expected and was not found"),
    ("GET", "/v2/models/m", 404, None),
    ("GET", "/v1", 404, None),
])
def test_tf_serving_routing_errors(http: SyncASGI, method: str, path: str, status: int, error: str | None) -> None:
    response = http.request(method, path, json={"instances": [1]})
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"] == error if error else "error" in response.json()


def test_names_and_labels_are_percent_decoded_and_paths_match_in_any_case(http: SyncASGI, fake: FakeClient) -> None:
    assert http.post("/V1/Models/m:PREDICT", json={"instances": [1]}).json() == {"predictions": [2]}
    http.get("/v1/models/my%20model/labels/blue%2Fgreen")
    assert fake.calls[-1] == ("status", {"model": "my model", "version": None, "label": "blue/green"})


def test_cors_preflight(http: SyncASGI) -> None:
    for origin in ("http://app.example", "HTTPS://app.example:8443"):
        response = http.request("OPTIONS", "/v1/models/m:predict", headers={"Origin": origin})
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == "*"
        assert response.headers["access-control-allow-methods"] == "POST, GET"
    for headers in ({}, {"Origin": "file://x"}, {"Origin": "null"}):
        response = http.request("OPTIONS", "/v1/models/m:predict", headers=headers)
        assert response.status_code == 400
        assert response.json() == {"error": "Origin header is missing in CORS preflight"}


def test_a_bug_in_the_client_is_a_json_500_and_the_app_keeps_serving(http: SyncASGI, fake: FakeClient) -> None:
    fake.error = RuntimeError("boom")
    response = http.post("/v1/models/m:predict", json={"instances": [1]})
    assert response.status_code == 500
    assert response.json() == {"error": "frontend error: RuntimeError: boom"}
    fake.error = None
    assert http.post("/v1/models/m:predict", json={"instances": [1]}).json() == {"predictions": [2]}


def test_the_caller_may_ask_for_a_shorter_deadline_but_not_a_longer_one(http: SyncASGI, fake: FakeClient) -> None:
    http.post("/v1/models/m:predict", json={"instances": [1]}, headers={"X-Request-Timeout-Ms": "250"})
    http.post("/v1/models/m:predict", json={"instances": [1]}, headers={"X-Request-Timeout-Ms": "999999"})
    assert [c[1]["timeout_s"] for c in fake.calls] == [0.25, 5.0]


def test_the_config_comes_from_one_variable_and_the_old_ones_still_count(monkeypatch: pytest.MonkeyPatch) -> None:
    from tfbroker.runtime.flags import dataclass_to_argv
    from tfbroker.runtime.settings import FRONTEND_ENV, GrpcOptions

    config = FrontendConfig(rest_api_timeout_in_ms=1234, limits=RequestLimits(max_instances=7),
                            grpc=GrpcOptions(port=8600, enable_grpc_healthcheck_service=True), metrics_path="/m")
    monkeypatch.setenv(FRONTEND_ENV, " ".join(dataclass_to_argv(config)))
    assert FrontendConfig.from_env() == config
    monkeypatch.delenv(FRONTEND_ENV)
    assert FrontendConfig.from_env() == FrontendConfig()
    # What deployments set before FrontendConfig: read as its flags, TFBROKER_FRONTEND winning.
    monkeypatch.setenv("TFBROKER_TIMEOUT_MS", "777")
    monkeypatch.setenv("TFBROKER_LIMITS", "--max_instances=9")
    monkeypatch.setenv("TFBROKER_GRPC", "--grpc_socket_path=/tmp/g.sock")
    monkeypatch.setenv("TFBROKER_STATUS_PAGE", "1")
    legacy = FrontendConfig.from_env()
    assert (legacy.rest_api_timeout_in_ms, legacy.limits.max_instances, legacy.grpc.port,
            legacy.grpc.grpc_socket_path, legacy.enable_status_page) == (777, 9, 8500, "/tmp/g.sock", True)
    monkeypatch.setenv(FRONTEND_ENV, "--rest_api_timeout_in_ms=55")
    assert FrontendConfig.from_env().rest_api_timeout_in_ms == 55


def test_a_wrong_flag_in_the_config_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    from tfbroker.runtime.settings import FRONTEND_ENV
    from tfbroker.wire.errors import ConfigError

    monkeypatch.setenv(FRONTEND_ENV, "--no_such_flag=1")
    with pytest.raises(ConfigError, match=FRONTEND_ENV):
        FrontendConfig.from_env()


def test_classify_writes_label_and_score_pairs(http: SyncASGI, fake: FakeClient) -> None:
    response = http.post("/v1/models/m:classify", json={"examples": [{"x": 1}, {"x": 2}], "signature_name": "c"})
    assert response.json() == {"results": [[["a", 0.1], ["b", 0.9]], [["a", 0.1], ["b", 0.9]]]}
    assert fake.calls[-1][1]["signature_name"] == "c" and len(fake.calls[-1][1]["examples"]) == 2
