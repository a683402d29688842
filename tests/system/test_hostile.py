"""Nothing a client sends can hurt the server: hostile tensors, deadlines, cancellation, limits.

Real broker, workers and frontends. Worker pids are compared before and after, and a steady
caller counts its own outcomes: any answer but 200, and any dropped connection, fails it.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import numpy as np
import pytest

from tfbroker.wire.errors import Cancelled, DeadlineExceeded, InvalidArgument
from tfbroker import AsyncClient, Client
from tests.conftest import BrokerProcess, serving

LIMITS = {"max_request_body_bytes": 200_000, "max_json_depth": 6, "max_instances": 1000,
          "max_string_bytes": 1000, "max_tensor_bytes": 400_000}


@pytest.fixture(scope="module")
def guarded(test_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    models = {name: test_models / name for name in ("linear", "two_io", "mlp", "slow", "half_plus_two")}
    # One batch in flight: a second request waits in the broker's queue while the slow model runs.
    args = ["--batches_in_flight=1", *[f"--{k}={v}" for k, v in LIMITS.items()]]
    with serving(tmp_path_factory.mktemp("guarded"), models, args, frontends=2) as broker:
        yield broker


def b64(text: str) -> dict[str, str]:
    import base64

    return {"b64": base64.b64encode(text.encode()).decode()}


HOSTILE: list[tuple[str, dict[str, Any]]] = [
    ("linear", {"inputs": 3.0}),                                   # a scalar, columnar
    ("linear", {"inputs": {"x": 3.0}}),
    ("linear", {"inputs": []}),                                    # zero rows
    ("linear", {"inputs": [[]]}),
    ("linear", {"instances": [[[1.0]]]}),                          # a rank the model does not take
    ("linear", {"instances": [True, False]}),                      # booleans for floats
    ("linear", {"instances": ["a", "b"]}),                         # strings for floats
    ("linear", {"instances": [1e300]}),                            # beyond float32
    ("two_io", {"inputs": {"a": [[1.0, 2.0]], "b": [1, 2, 3]}}),   # inputs with different batch sizes
    ("two_io", {"inputs": {"a": 1.0, "b": [1]}}),                  # a scalar beside a vector
    ("two_io", {"inputs": {"a": [[1.0, 2.0, 3.0]], "b": [1]}}),    # wrong inner shape
    ("two_io", {"inputs": {"a": [], "b": []}}),
    ("two_io", {"inputs": {"a": [[1.0, 2.0]], "b": [1.5]}}),       # a float for int64
    ("mlp", {"instances": [[0.0] * 5000]}),                        # a huge inner shape
    ("mlp", {"instances": [[0.0] * 8, [0.0] * 8], "signature_name": "nope"}),
]
HOSTILE += [
    # A legal request that once ended the worker: garbage where a tf.Example is expected.
    ("half_plus_two", {"signature_name": "classify_x_to_y", "inputs": b64("hello")}),
    ("half_plus_two", {"signature_name": "classify_x_to_y", "inputs": {"inputs": b64("hello")}}),
    ("half_plus_two", {"signature_name": "classify_x_to_y", "instances": [b64("hello"), b64("")]}),
    ("half_plus_two", {"signature_name": "regress_x_to_y", "inputs": [[b64("x")]]}),
    ("half_plus_two", {"inputs": {"x": [[1.0], [2.0]]}, "signature_name": "regress_x2_to_y3"}),
]


def worker_pids(broker: BrokerProcess) -> dict[str, int]:
    return {title: pids[0] for title, pids in broker.roles().items() if title.startswith("tfbroker: worker:")}


def test_hostile_tensors_leave_every_worker_up_and_a_steady_caller_unharmed(guarded: BrokerProcess) -> None:
    before = worker_pids(guarded)
    steady: list[str] = []
    stop = threading.Event()

    def call_steadily() -> None:
        with httpx.Client(base_url=guarded.base_url, timeout=30) as http:
            while not stop.is_set():
                try:
                    response = http.post("/v1/models/linear:predict", json={"instances": [2.0]})
                    steady.append("ok" if response.json() == {"predictions": [4.0]} else response.text)
                except httpx.HTTPError as exc:  # a dropped connection is a failure too
                    steady.append(repr(exc))

    thread = threading.Thread(target=call_steadily)
    thread.start()
    try:
        for _ in range(3):
            for model, body in HOSTILE:
                response = guarded.predict(model, body)
                assert response.headers["content-type"] == "application/json", (model, body, response.text)
                assert "error" in response.json() or response.status_code == 200, (model, body, response.text)
                assert response.status_code in (200, 400), (model, body, response.status_code, response.text)
    finally:
        stop.set()
        thread.join(timeout=60)
    assert worker_pids(guarded) == before, "no request may end a worker"
    assert steady and set(steady) == {"ok"}, [s for s in steady if s != "ok"][:5]
    assert guarded.predict("two_io", {"inputs": {"a": [[1.0, 2.0]], "b": [3]}}).json() == {
        "outputs": {"label_bytes": [{"b64": "Mw=="}], "sum": [6.0]}}


def test_hostile_tensors_from_the_python_client(guarded: BrokerProcess) -> None:
    before = worker_pids(guarded)
    cases = [
        {"x": np.zeros((0,), np.float32)},
        {"x": np.zeros((), np.float32)},
        {"x": np.zeros((2, 0), np.float32)},
        {"x": np.zeros((1, 1, 1, 1), np.float64)},
        {"x": np.array([b"a"], dtype=object)},
        {"x": np.zeros(3, np.complex64)},
        {"x": np.zeros(3, np.uint64)},
        {"y": np.zeros(3, np.float32)},
    ]
    with Client(guarded.address, timeout_s=30) as client:
        for inputs in cases:
            try:
                client.predict("linear", inputs)
            except InvalidArgument:
                pass
        assert worker_pids(guarded) == before
        assert client.predict("linear", {"x": np.array([2.0], np.float32)}).outputs["y"].tolist() == [4.0]


def test_a_version_beyond_int64_is_a_json_400(guarded: BrokerProcess) -> None:
    huge = "9" * 30
    for response in (guarded.http.get(f"/v1/models/linear/versions/{huge}"),
                     guarded.http.get(f"/v1/models/linear/versions/{huge}/metadata"),
                     guarded.predict("linear", {"instances": [1.0]}, suffix=f"/versions/{huge}")):
        assert response.status_code == 400, response.text
        assert response.json() == {"error": f"Failed to convert version: {huge} to numeric."}


def slow_calls(broker: BrokerProcess) -> int:
    """How many times the slow model has run, this call included."""
    response = broker.predict("slow", {"instances": [0.0]})
    assert response.status_code == 200, response.text
    return int(response.json()["predictions"][0])


def test_a_request_past_its_deadline_never_reaches_the_model(guarded: BrokerProcess) -> None:
    first = slow_calls(guarded)
    occupy = threading.Thread(target=slow_calls, args=(guarded,))  # holds the worker ~0.3 s or more
    occupy.start()
    time.sleep(0.05)
    late = guarded.http.post("/v1/models/slow:predict", json={"instances": [0.0]},
                             headers={"X-Request-Timeout-Ms": "100"})
    occupy.join(timeout=60)
    assert late.status_code == 504, late.text
    assert late.json() == {"error": "Deadline Exceeded"}
    assert slow_calls(guarded) == first + 2, "the late request was not run"
    with Client(guarded.address) as client:
        assert client.stats()["expired"] >= 1


def test_a_bad_deadline_header_is_a_400(guarded: BrokerProcess) -> None:
    response = guarded.http.post("/v1/models/linear:predict", json={"instances": [1.0]},
                                 headers={"X-Request-Timeout-Ms": "soon"})
    assert response.status_code == 400 and "X-Request-Timeout-Ms" in response.json()["error"]


def test_a_disconnected_http_client_cancels_its_queued_request(guarded: BrokerProcess) -> None:
    with Client(guarded.address) as client:
        cancelled_before = client.stats()["cancelled"]
    first = slow_calls(guarded)
    occupy = threading.Thread(target=slow_calls, args=(guarded,))
    occupy.start()
    time.sleep(0.05)
    with pytest.raises(httpx.ReadTimeout):  # gives up and closes its connection
        httpx.post(f"{guarded.base_url}/v1/models/slow:predict", json={"instances": [0.0]}, timeout=0.1)
    occupy.join(timeout=60)
    assert slow_calls(guarded) == first + 2, "the abandoned request was not run"
    with Client(guarded.address) as client:
        assert client.stats()["cancelled"] == cancelled_before + 1


def test_a_cancelled_python_call_cancels_its_queued_request(guarded: BrokerProcess) -> None:
    async def main() -> None:
        async with AsyncClient(guarded.address, timeout_s=30) as client:
            before = (await client.stats())["cancelled"]
            occupy = asyncio.ensure_future(client.predict("slow", {"x": np.zeros(1, np.float32)}))
            await asyncio.sleep(0.05)
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(client.predict("slow", {"x": np.zeros(1, np.float32)}), 0.05)
            first = int((await occupy).outputs["y"][0])
            after = int((await client.predict("slow", {"x": np.zeros(1, np.float32)})).outputs["y"][0])
            assert after == first + 1, "the cancelled request was not run"
            assert (await client.stats())["cancelled"] == before + 1

    asyncio.run(main())


def test_a_sync_client_timeout_cancels_its_queued_request(guarded: BrokerProcess) -> None:
    with Client(guarded.address, timeout_s=30) as client:
        before = client.stats()["cancelled"]
        first = slow_calls(guarded)
        occupy = threading.Thread(target=slow_calls, args=(guarded,))
        occupy.start()
        time.sleep(0.05)
        with pytest.raises((DeadlineExceeded, Cancelled)):
            client.predict("slow", {"x": np.zeros(1, np.float32)}, timeout_s=0.01)
        occupy.join(timeout=60)
        assert slow_calls(guarded) == first + 2
        assert client.stats()["cancelled"] + client.stats()["expired"] > before


@pytest.mark.parametrize(("body", "status", "message"), [
    (b'{"instances": [' + b"1.0," * 60_000 + b"1.0]}", 413, "exceeds the limit of 200000 bytes"),
    (b'{"instances": [[[[[[[[1.0]]]]]]]]}', 400, "nested deeper than the limit of 6"),
    (b'{"instances": [' + b"1," * 1000 + b"1]}", 400, "1001 instances exceed the limit of 1000"),
    (b'{"inputs": {"x": [' + b"1," * 1000 + b"1]}}", 400, "1001 rows exceed the limit of 1000"),
    (b'{"instances": ["' + b"a" * 1001 + b'"]}', 400, "a string exceeds the limit of 1000 bytes"),
    (b'{"instances": [{"b64": "' + b"QUFB" * 400 + b'"}]}', 400, "a string exceeds the limit of 1000 bytes"),
    (json.dumps({"inputs": {"x": [[1] * 1000] * 60}}).encode(), 400, "exceed the limit of 400000 bytes"),
])
def test_limits_refuse_hostile_sizes(guarded: BrokerProcess, body: bytes, status: int, message: str) -> None:
    response = guarded.http.post("/v1/models/linear:predict", content=body,
                                 headers={"content-type": "application/json"})
    assert response.status_code == status, response.text[:300]
    assert message in response.json()["error"]
    assert guarded.predict("linear", {"instances": [2.0]}).json() == {"predictions": [4.0]}


def test_a_body_without_content_length_is_still_held_to_the_limit(guarded: BrokerProcess) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"instances": ['
        for _ in range(30):
            yield b"1.0," * 2_000
        yield b"1.0]}"

    response = guarded.http.post("/v1/models/linear:predict", content=chunks(),
                                 headers={"content-type": "application/json"})
    assert response.status_code == 413, response.text[:300]


def test_a_frontend_at_its_limit_answers_503_with_retry_after_at_once(start_broker: Any, test_models: Path) -> None:
    broker = start_broker(["--model_name=slow", f"--model_base_path={test_models / 'slow'}",
                           "--max_concurrent_predictions=1"], frontends=1)
    broker.wait_available(["slow"])
    occupy = threading.Thread(target=slow_calls, args=(broker,))
    occupy.start()
    time.sleep(0.1)
    refused = broker.predict("slow", {"instances": [0.0]})
    answered_first = occupy.is_alive()
    occupy.join(timeout=60)
    assert refused.status_code == 503, refused.text
    assert refused.headers["retry-after"] == "1"
    assert "limit" in refused.json()["error"]
    assert answered_first, "refused at once, while the admitted request was still running"
    assert broker.predict("slow", {"instances": [0.0]}).status_code == 200


def test_raw_http_pipelined_and_expect_continue_requests_are_answered_whole(guarded: BrokerProcess) -> None:
    """The frontends send each answer's head and body together (frontend/http_protocol.py):
    pipelined requests, a client waiting for 100 Continue and Connection: close all get
    complete answers, in order."""
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(guarded.base_url)
    body = b'{"instances": [1.0]}'
    request = (b"POST /v1/models/linear:predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n" % len(body))

    def read_answers(sock: socket.socket, count: int) -> list[bytes]:
        data = b""
        while data.count(b"HTTP/1.1 200") < count or not data.endswith(b"]}"):
            chunk = sock.recv(65536)
            assert chunk, f"the frontend closed the connection after {data!r}"
            data += chunk
        return data.split(b"HTTP/1.1 ")[1:]

    def pipelined(x: float) -> bytes:
        data = b'{"instances": [%r]}' % x
        return (b"POST /v1/models/linear:predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % len(data) + data)

    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        # The first is answered below ASGI (frontend/http_protocol.py), the others wait their turn.
        sock.sendall(pipelined(1.0) + pipelined(2.0) + pipelined(3.0))
        answers = read_answers(sock, 3)
        assert len(answers) == 3 and all(a.startswith(b"200 OK") for a in answers)
        assert [json.loads(a.split(b"\r\n\r\n", 1)[1])["predictions"] for a in answers] == [[3.5], [4.0], [4.5]]  # 0.5 x + 3, in order
        sock.sendall(request + b"Expect: 100-continue\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 100 Continue")
        sock.sendall(body)
        assert b'"predictions"' in read_answers(sock, 1)[0]
        sock.sendall(request + b"Connection: close\r\n\r\n" + body)
        answer = read_answers(sock, 1)[0]
        assert b"connection: close" in answer.lower()
        assert sock.recv(65536) == b"", "the connection stays open after Connection: close"
