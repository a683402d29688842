"""The REST API under granian's RSGI interface (``frontend.rsgi:app``) answers as the ASGI
frontend does, byte for byte, against the same broker."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import httpx
import psutil
import pytest

from broker.supervisor import terminate
from tests.conftest import ROOT, BrokerProcess, free_port, make_model_config, stop_and_check, wait_for
from tests.unit.frontend.test_request_log import read_records

pytest.importorskip("granian", reason="granian is not installed (pip install -e '.[test]')")


@dataclass(frozen=True)
class Served:
    asgi: httpx.Client  # the broker's uvicorn frontend
    rsgi: httpx.Client  # granian's RSGI frontends
    rsgi_pids: set[int]  # granian's processes
    grpc_port: int  # gRPC, served by granian's workers too, as by uvicorn's
    logs: Path  # model logged's request-log prefix
    receiver: Any  # the OTLP receiver granian's workers export to; None without opentelemetry-proto


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, test_models: Path) -> Iterator[Served]:
    """One broker with a uvicorn frontend, and granian's RSGI frontends on another port, which
    trace (to a receiver here) and write the request log of model ``logged``."""
    tmp_path = tmp_path_factory.mktemp("rsgi")
    logs = tmp_path / "logs" / "logged"
    config = make_model_config({"linear": test_models / "linear", "two_io": test_models / "two_io"})
    config = config.rstrip().removesuffix("}") + f"""  config {{ name: "logged" base_path: "{test_models / 'linear'}"
    model_platform: "tensorflow" logging_config {{ sampling_config {{ sampling_rate: 1.0 }}
    log_collector_config {{ type: "tfrecord" filename_prefix: "{logs}" }} }} }}
}}
"""
    (tmp_path / "models.config").write_text(config)
    broker = BrokerProcess(tmp_path, [f"--model_config_file={tmp_path / 'models.config'}",
                                      "--max_request_body_bytes=4096"], frontends=1)
    port, grpc_port = free_port(), free_port()
    env = {**os.environ, "TFBROKER_ADDRESS": broker.address,
           "TFBROKER_FRONTEND": f"--max_request_body_bytes=4096 --port={grpc_port}"}
    try:
        from tests.system.test_tracing import Receiver
        receiver: Any = Receiver()
        env.update(OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=receiver.endpoint, OTEL_BSP_SCHEDULE_DELAY="100")
    except pytest.skip.Exception:
        receiver = None
    granian = subprocess.Popen([sys.executable, "-m", "granian", "--interface", "rsgi", "--workers", "2", "--host",
                                "127.0.0.1", "--port", str(port), "--log-level", "warning", "frontend.rsgi:app"],
                               cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rsgi = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    try:
        broker.wait_available(["linear", "two_io", "logged"])

        def up() -> bool:
            try:
                return rsgi.post("/v1/models/linear:predict", json={"instances": [1.0]}).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, 60, "granian's frontends")
        pids = {granian.pid, *(p.pid for p in psutil.Process(granian.pid).children(recursive=True))}
        yield Served(broker.http, rsgi, pids, grpc_port, logs, receiver)
    finally:
        rsgi.close()
        terminate(granian, grace_s=10)
        stop_and_check(broker)
        if receiver is not None:
            receiver.close()


@pytest.fixture
def both(served: Served) -> tuple[httpx.Client, httpx.Client]:
    return served.asgi, served.rsgi


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


def test_rsgi_serves_grpc_as_uvicorn_does(served: Served) -> None:
    import numpy as np
    import tritonclient.grpc as triton_grpc

    client = triton_grpc.InferenceServerClient(f"127.0.0.1:{served.grpc_port}")
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


def test_rsgi_frontends_trace_and_log_requests_as_uvicorn_frontends_do(served: Served) -> None:
    import numpy as np

    from frontend import grpc_messages as pb

    callers = {secrets.token_hex(16): secrets.token_hex(8) for _ in range(4)}
    for i, (trace_id, caller) in enumerate(callers.items()):
        response = served.rsgi.post("/v1/models/logged:predict", json={"instances": [float(i)]},
                                    headers={"traceparent": f"00-{trace_id}-{caller}-01"})
        assert response.status_code == 200, response.text

    def records() -> list[Any]:
        return [pb.PredictionLog.FromString(r) for f in sorted(served.logs.parent.glob("logged-*.tfrecord"))
                for r in read_records(f)]

    found = wait_for(lambda: len(got := records()) == len(callers) and got, 30, "a record of each request")
    # "instances" names no input: the log names it, as under uvicorn (float64: JSON's numbers).
    sent = sorted(np.frombuffer(r.predict_log.request.inputs["x"].tensor_content, np.float64).tolist() for r in found)
    assert sent == [[0.0], [1.0], [2.0], [3.0]]
    assert {int(f.name.rsplit("-", 2)[1]) for f in served.logs.parent.glob("logged-*.tfrecord")} <= served.rsgi_pids
    if served.receiver is None:
        pytest.skip("opentelemetry-proto is not installed: the records were checked, the traces cannot be")
    for trace_id, caller in callers.items():
        spans = wait_for(lambda t=trace_id: served.receiver.trace(t), 30, "the RSGI frontend's span")
        (span,) = spans
        assert (span.name, span.parent_id, span.attributes["model.name"], span.attributes["http.response.status_code"]) \
            == ("tfbroker predict", caller, "logged", 200)
        assert span.pid in served.rsgi_pids
