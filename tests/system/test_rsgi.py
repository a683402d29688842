"""The REST API under granian's RSGI interface (``frontend.rsgi:app``) answers as the ASGI
frontend does, byte for byte, against the same broker."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from broker.supervisor import terminate
from tests.conftest import ROOT, BrokerProcess, free_port, make_model_config, stop_and_check, wait_for

pytest.importorskip("granian", reason="granian is not installed (pip install -e '.[test]')")


@pytest.fixture(scope="module")
def both(tmp_path_factory: pytest.TempPathFactory, test_models: Path) -> Iterator[tuple[httpx.Client, httpx.Client]]:
    """One broker with a uvicorn frontend, and granian's RSGI frontends on another port."""
    tmp_path = tmp_path_factory.mktemp("rsgi")
    (tmp_path / "models.config").write_text(make_model_config({"linear": test_models / "linear",
                                                               "two_io": test_models / "two_io"}))
    broker = BrokerProcess(tmp_path, [f"--model_config_file={tmp_path / 'models.config'}",
                                      "--max_request_body_bytes=4096"], frontends=1)
    port = free_port()
    global RSGI_GRPC_PORT
    RSGI_GRPC_PORT = free_port()  # gRPC served by granian's workers too, as by uvicorn's
    env = {**os.environ, "TFBROKER_ADDRESS": broker.address,
           "TFBROKER_FRONTEND": f"--max_request_body_bytes=4096 --port={RSGI_GRPC_PORT}"}
    granian = subprocess.Popen([sys.executable, "-m", "granian", "--interface", "rsgi", "--workers", "2", "--host",
                                "127.0.0.1", "--port", str(port), "--log-level", "warning", "frontend.rsgi:app"],
                               cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rsgi = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    try:
        broker.wait_available(["linear", "two_io"])

        def up() -> bool:
            try:
                return rsgi.post("/v1/models/linear:predict", json={"instances": [1.0]}).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, 60, "granian's frontends")
        yield broker.http, rsgi
    finally:
        rsgi.close()
        terminate(granian, grace_s=10)
        stop_and_check(broker)


CASES = [
    ("POST", "/v1/models/linear:predict", b'{"instances": [1.0, 2.0, 5.0]}', {}),
    ("POST", "/v1/models/linear/versions/2:predict", b'{"inputs": [1.0]}', {}),
    ("POST", "/v1/models/two_io:predict", b'{"instances": [{"a": [1, 2], "b": 3}]}', {}),
    ("POST", "/v1/models/linear:predict", b'{"instances": [1.0', {}),
    ("POST", "/v1/models/linear:predict", b'{"instances": ["x"]}', {}),
    ("POST", "/v1/models/nope:predict", b'{"instances": [1.0]}', {}),
    ("POST", "/v1/models/linear:predict", b'{"instances": [1.0]}', {"x-request-timeout-ms": "soon"}),
    ("POST", "/v1/models/linear:predict", b'{"instances": [' + b"1.0, " * 1000 + b"1.0]}", {}),
    ("GET", "/v1/models/linear", b"", {}),
    ("GET", "/v1/models/linear/metadata", b"", {}),
    ("GET", "/v1/models/linear/versions/7", b"", {}),
    ("POST", "/v1/models/linear:explode", b"{}", {}),
    ("GET", "/elsewhere", b"", {}),
    ("POST", "/v2/models/linear/infer", b'{"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1, 2]}]}',
     {}),
    ("POST", "/v2/models/linear/infer", b'{"inputs": []}', {}),
    ("GET", "/v2/health/ready", b"", {}),
    ("GET", "/v2/models/linear", b"", {}),
]
RSGI_GRPC_PORT = 0


def test_rsgi_serves_grpc_as_uvicorn_does(both: tuple[httpx.Client, httpx.Client]) -> None:
    import numpy as np
    import tritonclient.grpc as triton_grpc

    client = triton_grpc.InferenceServerClient(f"127.0.0.1:{RSGI_GRPC_PORT}")
    try:
        wait_for(lambda: _ready(client), 30, "granian's gRPC")
        given = triton_grpc.InferInput("x", [2], "FP32")
        given.set_data_from_numpy(np.array([1.0, 2.0], np.float32))
        assert client.infer("linear", [given]).as_numpy("y").tolist() == [3.5, 4.0]
    finally:
        client.close()


def _ready(client: object) -> bool:
    from tritonclient.utils import InferenceServerException

    try:
        return bool(client.is_server_ready())  # type: ignore[attr-defined]
    except InferenceServerException:
        return False


@pytest.mark.parametrize("method, path, body, headers", CASES)
def test_rsgi_answers_as_the_asgi_frontend(both: tuple[httpx.Client, httpx.Client], method: str, path: str,
                                           body: bytes, headers: dict[str, str]) -> None:
    asgi, rsgi = both
    want = asgi.request(method, path, content=body, headers=headers)
    got = rsgi.request(method, path, content=body, headers=headers)
    assert (got.status_code, got.content) == (want.status_code, want.content)
    for name in ("content-type", "x-model-version", "retry-after"):
        assert got.headers.get(name) == want.headers.get(name), name
