"""End to end: one broker, its workers and HTTP frontends, real models, concurrent callers."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import msgpack
import numpy as np
import pytest
import zmq

from tfbroker.wire import protocol
from tfbroker.wire.errors import InvalidArgument, NotFound
from tfbroker import AsyncClient, Client
from tfbroker.client import encode_predict, prediction, read_answers
from tests.conftest import (TESTDATA, BrokerProcess, make_model_config, reference_outputs,
                            stop_and_check, wait_for)

MAX_BATCH = 8
ALLOWED = (1, 2, 4, 8)
FRONTENDS = 3


@pytest.fixture(scope="module")
def served(test_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    tmp = tmp_path_factory.mktemp("served")
    models = {name: test_models / name for name in ("linear", "mlp", "batch_reporter", "two_io", "checked", "broken",
                                                    "half_plus_two", "half_plus_three", "half_plus_two_tf2")}
    (tmp / "models.config").write_text(make_model_config(models, labels={"linear": {"stable": 2}}))
    (tmp / "batching.config").write_text(
        f"max_batch_size {{ value: {MAX_BATCH} }}\n"
        "batch_timeout_micros { value: 20000 }\n"
        "max_enqueued_batches { value: 1000 }\n"
        + "".join(f"allowed_batch_sizes: {size}\n" for size in ALLOWED))
    broker = BrokerProcess(tmp, [f"--model_config_file={tmp / 'models.config'}",
                                 f"--batching_parameters_file={tmp / 'batching.config'}"], frontends=FRONTENDS)
    try:
        broker.wait_available([m for m in models if m != "broken"])
        yield broker
    finally:
        stop_and_check(broker)


# --- models shaped as TF Serving's own test models (tests/tfserving_models.py) --------------

def test_half_plus_two_gives_tf_serving_answers(served: BrokerProcess) -> None:
    response = served.predict("half_plus_two", {"instances": [1.0, 2.0, 5.0]})
    assert response.status_code == 200, response.text
    assert response.json() == {"predictions": [2.5, 3.0, 4.5]}
    assert response.headers["x-model-version"] == "123"
    response = served.predict("half_plus_two", {"inputs": {"x": [[1.0], [2.0]]}})
    assert response.json() == {"outputs": [[2.5], [3.0]]}
    response = served.predict("half_plus_two", {"instances": [1.0, 2.0]}, suffix="/versions/123")
    assert response.json() == {"predictions": [2.5, 3.0]}


def test_half_plus_three_loads_through_the_v1_loader(served: BrokerProcess) -> None:
    response = served.predict("half_plus_three", {"instances": [1.0, 2.0, 5.0]})
    assert response.json() == {"predictions": [3.5, 4.0, 5.5]}


def test_tf2_export(served: BrokerProcess) -> None:
    response = served.predict("half_plus_two_tf2", {"instances": [2.0]})
    assert response.json() == {"predictions": [3.0]}


def test_status_and_metadata_in_tf_serving_json(served: BrokerProcess) -> None:
    status = served.http.get("/v1/models/half_plus_two").json()
    assert status == {"model_version_status": [
        {"version": "123", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]}
    assert served.http.get("/v1/models/half_plus_two/versions/123").json() == status
    metadata = served.http.get("/v1/models/half_plus_two/metadata").json()
    assert metadata["model_spec"] == {"name": "half_plus_two", "signature_name": "", "version": "123"}
    signatures = metadata["metadata"]["signature_def"]["signature_def"]
    assert {name: sig["method_name"].rpartition("/")[2] for name, sig in signatures.items()} == {
        "serving_default": "predict", "classify_x_to_y": "classify", "regress_x_to_y": "regress",
        "regress_x_to_y2": "regress", "regress_x2_to_y3": "regress"}
    assert signatures["serving_default"]["inputs"]["x"] == {
        "dtype": "DT_FLOAT", "name": "x:0",
        "tensor_shape": {"dim": [{"size": "-1", "name": ""}, {"size": "1", "name": ""}], "unknown_rank": False}}
    if TESTDATA.is_dir():  # the same model as TF Serving's: its own expected metadata, to the byte
        expected = json.loads((TESTDATA / "half_plus_two_model_metadata.json").read_text())
        assert metadata["model_spec"] == {**expected["model_spec"], "name": "half_plus_two"}
        assert metadata["metadata"] == expected["metadata"]


# --- correctness under concurrency ----------------------------------------------------------

def test_outputs_equal_in_process_tensorflow_under_concurrency(served: BrokerProcess, test_models: Path,
                                                               request: pytest.FixtureRequest) -> None:
    rng = np.random.default_rng()
    requests = [{"x": rng.standard_normal((int(rng.integers(1, 4)), 8)).astype(np.float32)} for _ in range(60)]
    expected = reference_outputs(test_models / "mlp" / "1", requests)
    client = Client(served.address, timeout_s=30)
    request.addfinalizer(client.close)

    def over_http(i: int) -> np.ndarray:
        response = served.predict("mlp", {"instances": requests[i]["x"].tolist()})
        assert response.status_code == 200, response.text
        return np.array(response.json()["predictions"], dtype=np.float32)

    def over_client(i: int) -> np.ndarray:
        return client.predict("mlp", requests[i]).outputs["y"]

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda i: (over_http if i % 2 else over_client)(i), range(len(requests))))
    for i, (value, want) in enumerate(zip(got, expected)):
        assert value.shape == want["y"].shape, f"request {i} got {value.shape[0]} rows, sent {want['y'].shape[0]}"
        np.testing.assert_allclose(value, want["y"], rtol=1e-5, atol=1e-5, err_msg=f"request {i}")


def test_a_request_larger_than_a_batch_is_split_and_answered_whole(served: BrokerProcess) -> None:
    """As TF Serving with enable_large_batch_splitting: 19 rows run as batches of 8, 8 and 3
    (padded to the allowed 8, 8 and 4: what batch_reporter answers), answered in order."""
    response = served.predict("batch_reporter", {"instances": [0.0] * (2 * MAX_BATCH + 3)})
    assert response.status_code == 200, response.text
    assert response.json()["predictions"] == [8.0] * 16 + [4.0] * 3
    rows = list(np.linspace(-5, 5, 3 * MAX_BATCH + 2))
    assert served.predict("linear", {"instances": rows}).json()["predictions"] == pytest.approx(
        [0.5 * x + 3 for x in rows])


def test_batches_form_and_never_exceed_max_batch_size(served: BrokerProcess, request: pytest.FixtureRequest) -> None:
    client = Client(served.address, timeout_s=30)
    request.addfinalizer(client.close)

    def call(i: int) -> tuple[int, np.ndarray]:
        rows = 1 + i % 3
        x = np.full(rows, float(i), np.float32)
        return rows, client.predict("batch_reporter", {"x": x}).outputs["y"]

    with ThreadPoolExecutor(24) as pool:
        results = list(pool.map(call, range(240)))
    sizes = []
    for rows, y in results:
        assert y.shape == (rows,), "every caller gets exactly its own rows"
        assert len(set(y.tolist())) == 1, "all rows of one request ran in one batch"
        sizes.append(int(y[0]))
    assert set(sizes) <= set(ALLOWED), f"batches are padded to allowed sizes, saw {sorted(set(sizes))}"
    assert max(sizes) <= MAX_BATCH
    assert max(sizes) > 1, "concurrent requests share batches"


def test_every_caller_gets_its_own_rows_from_a_shared_batch(served: BrokerProcess) -> None:
    async def main() -> list[tuple[float, np.ndarray]]:
        async with AsyncClient(served.address, timeout_s=30) as client:
            values = [float(i) for i in range(64)]
            results = await asyncio.gather(*[
                client.predict("linear", {"x": np.array([v, v + 0.5], np.float32)}, version=2) for v in values])
            return [(v, r.outputs["y"]) for v, r in zip(values, results)]

    for value, y in asyncio.run(main()):
        np.testing.assert_allclose(y, [0.5 * value + 3, 0.5 * (value + 0.5) + 3])


def test_named_inputs_and_string_outputs(served: BrokerProcess) -> None:
    response = served.predict("two_io", {"instances": [{"a": [1.0, 2.0], "b": 3}, {"a": [0.5, 0.5], "b": 7}]})
    assert response.status_code == 200, response.text
    assert response.json() == {"predictions": [
        {"sum": 6.0, "label_bytes": {"b64": "Mw=="}}, {"sum": 8.0, "label_bytes": {"b64": "Nw=="}}]}
    response = served.predict("two_io", {"inputs": {"a": [[1.0, 1.0]], "b": [1]}})
    assert response.json() == {"outputs": {"sum": [3.0], "label_bytes": [{"b64": "MQ=="}]}}


def test_versions_and_labels(served: BrokerProcess) -> None:
    # The highest version (2: y = 0.5x + 3) is served; version 1 is not loaded.
    assert served.predict("linear", {"instances": [2.0]}).json() == {"predictions": [4.0]}
    assert served.predict("linear", {"instances": [2.0]}, suffix="/labels/stable").json() == {"predictions": [4.0]}
    assert served.predict("linear", {"instances": [2.0]}, suffix="/versions/1").status_code == 404
    response = served.predict("linear", {"instances": [2.0]}, suffix="/labels/canary")
    assert response.status_code == 400, "TF Serving's InvalidArgument for a label it does not know"
    assert response.json() == {"error": "Unrecognized servable version label: canary"}


# --- the process architecture ---------------------------------------------------------------

def test_one_worker_per_model_and_light_frontends(served: BrokerProcess) -> None:
    roles = served.roles()
    workers = [title for title in roles if title.startswith("tfbroker: worker:")]
    expected = {"tfbroker: worker:linear:2", "tfbroker: worker:mlp:1", "tfbroker: worker:batch_reporter:1",
                "tfbroker: worker:two_io:1"}
    assert expected <= set(workers)
    for title in workers:
        assert len(roles[title]) == 1, f"{title} runs {len(roles[title])} times"
    frontends = sorted(t for t in roles if t.startswith("tfbroker: frontend:"))
    assert frontends == [f"tfbroker: frontend:{i}" for i in range(1, FRONTENDS + 1)]
    for title in frontends + ["broker"]:
        pid = served.pid if title == "broker" else roles[title][0]
        maps = Path(f"/proc/{pid}/maps").read_text()
        assert "tensorflow" not in maps, f"{title} has TensorFlow loaded"
    worker_maps = Path(f"/proc/{roles['tfbroker: worker:mlp:1'][0]}/maps").read_text()
    assert "tensorflow" in worker_maps  # the check above can see TensorFlow where it is


def test_broken_model_is_reported_and_others_keep_serving(served: BrokerProcess) -> None:
    status = wait_for(lambda: (lambda s: s if s["model_version_status"][0]["state"] == "END" else None)(
        served.http.get("/v1/models/broken").json()), 60, "the broken model to be reported")
    version = status["model_version_status"][0]
    assert version["status"]["error_code"] != "OK"
    assert "saved_model.pb" in version["status"]["error_message"] or "SavedModel" in version["status"]["error_message"]
    response = served.predict("broken", {"instances": [1.0]})
    assert response.status_code == 503
    assert served.predict("linear", {"instances": [0.0]}).status_code == 200


# --- bad input ------------------------------------------------------------------------------

BAD_REQUESTS = [
    ("linear", b'{"instances": [1.0, 2.0', 400, "JSON Parse error"),
    ("linear", b'[1, 2]', 400, "not a JSON object"),
    ("linear", b'{"signature_name": "serving_default"}', 400, "Missing 'inputs' or 'instances'"),
    ("linear", b'{"instances": [1.0], "inputs": [1.0]}', 400, "Not both"),
    ("linear", b'{"instances": ["a", "b"]}', 400, "values of type string are not of expected type: float"),
    ("linear", b'{"instances": [1.0], "signature_name": "nope"}', 400, 'Serving signature name: "nope" not found'),
    ("linear", b'{"instances": [[1.0], [2.0, 3.0]]}', 400, "Expecting tensor size: 1 but got: 2"),
    ("linear", b'{"instances": [{"z": 1.0}]}', 400, "input tensor alias not found in signature: z. Inputs expected"),
    ("mlp", b'{"instances": [[1.0, 2.0, 3.0]]}', 400, ""),
    ("two_io", b'{"instances": [{"a": [1.0, 2.0]}]}', 400, "Missing but required: {b}."),
    ("nosuchmodel", b'{"instances": [1.0]}', 404, "Servable not found for request: Latest(nosuchmodel)"),
    ("linear/versions/99", b'{"instances": [1.0]}', 404, "Specific(linear, 99)"),
]


@pytest.mark.parametrize(("path", "body", "status", "message"), BAD_REQUESTS)
def test_bad_input_gets_a_clear_json_error(served: BrokerProcess, path: str, body: bytes, status: int,
                                           message: str) -> None:
    response = served.http.post(f"/v1/models/{path}:predict", content=body)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]
    assert served.predict("linear", {"instances": [2.0]}).json() == {"predictions": [4.0]}


def test_bad_request_in_a_shared_batch_fails_alone(served: BrokerProcess) -> None:
    good = {"instances": [[0.0] * 8]}
    bad = {"instances": [[0.0] * 3]}

    def call(i: int) -> int:
        return served.predict("mlp", bad if i % 5 == 0 else good).status_code

    with ThreadPoolExecutor(12) as pool:
        statuses = list(pool.map(call, range(60)))
    assert [s for i, s in enumerate(statuses) if i % 5 == 0] == [400] * 12
    assert [s for i, s in enumerate(statuses) if i % 5] == [200] * 48


def test_bad_values_in_a_joined_batch_fail_alone(served: BrokerProcess) -> None:
    """Requests of equal shapes travel joined; one whose values the model refuses must fail
    alone while the rest of its batch is answered."""
    async def main() -> list[Any]:
        async with AsyncClient(served.address, timeout_s=30) as client:
            calls = [client.predict("checked", {"x": np.array([-1.0 if i % 4 == 0 else i, 1.0], np.float32)})
                     for i in range(40)]
            return await asyncio.gather(*calls, return_exceptions=True)

    with Client(served.address) as client:
        stats_before = client.stats()
    results = asyncio.run(main())
    for i, result in enumerate(results):
        if i % 4 == 0:
            assert isinstance(result, InvalidArgument) and "must not be negative" in str(result), result
        else:
            assert not isinstance(result, BaseException), result
            np.testing.assert_allclose(result.outputs["y"], [2.0 * i, 2.0])
    with Client(served.address) as client:
        stats_after = client.stats()
    batches = stats_after["batches"] - stats_before["batches"]
    assert batches < 40, "the requests shared batches"
    assert stats_after["joined"] - stats_before["joined"] == batches, "every batch travelled joined"


def test_unknown_paths_and_unsupported_verbs(served: BrokerProcess) -> None:
    assert served.http.get("/v1/nothing").json() == {"error": "Malformed request: GET /v1/nothing"}
    assert served.http.get("/v1/nothing").status_code == 400
    assert served.http.get("/v2/nothing").status_code == 404
    assert served.http.post("/v1/models/linear:explode", json={}).status_code == 400
    assert served.http.get("/v1/models/nosuchmodel").status_code == 404
    assert served.http.post("/V1/MODELS/linear:PREDICT", json={"instances": [2.0]}).json() == {"predictions": [4.0]}
    assert served.http.get("/v1/models/lin%65ar").json()["model_version_status"][0]["state"] == "AVAILABLE"


def test_python_client_raises_the_wire_errors(served: BrokerProcess) -> None:
    with Client(served.address, timeout_s=10) as client:
        check_client_errors(client)


def check_client_errors(client: Client) -> None:
    with pytest.raises(NotFound):
        client.predict("nosuchmodel", {"x": np.zeros(1, np.float32)})
    large = client.predict("linear", {"x": np.arange(3 * MAX_BATCH + 1, dtype=np.float32)})  # split, answered whole
    np.testing.assert_array_equal(large.outputs["y"], np.arange(3 * MAX_BATCH + 1, dtype=np.float32) * 0.5 + 3)
    assert client.status("linear")["model_version_status"][0]["state"] == "AVAILABLE"
    assert "serving_default" in client.metadata("linear")["signature_def"]["signature_def"]


# --- failure and recovery (last: it restarts a worker) --------------------------------------

def test_killed_worker_fails_in_flight_requests_with_503_and_comes_back(served: BrokerProcess) -> None:
    [old_pid] = served.pids_with("tfbroker: worker:batch_reporter:")
    stop = time.monotonic() + 4.0

    def hammer(_: int) -> list[tuple[int, float]]:
        seen = []
        while time.monotonic() < stop:
            started = time.monotonic()
            response = served.predict("batch_reporter", {"instances": [1.0]})
            seen.append((response.status_code, time.monotonic() - started))
        return seen

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(hammer, i) for i in range(8)]
        time.sleep(1.0)
        os.kill(old_pid, signal.SIGKILL)
        results = [r for f in futures for r in f.result(timeout=60)]
    statuses = {status for status, _ in results}
    assert statuses <= {200, 503}, statuses
    assert 503 in statuses, "requests in flight on the killed worker get 503"
    assert max(elapsed for _, elapsed in results) < 10, "nothing hangs"
    assert f"(pid {old_pid}) exited with code -9 holding these requests: id " in served.log(), \
        "the log names the requests a dead worker held"
    assert "batch_reporter/serving_default [(only) float64[1]]" in served.log()  # (JSON numbers: float64)
    served.wait_available(["batch_reporter"])
    [new_pid] = served.pids_with("tfbroker: worker:batch_reporter:")
    assert new_pid != old_pid
    with Client(served.address, timeout_s=20) as client:
        assert client.predict("batch_reporter", {"x": np.zeros(1, np.float32)}).outputs["y"].shape == (1,)


def test_client_made_before_a_fork_works_in_the_child(served: BrokerProcess) -> None:
    """As under gunicorn's preload: the client was used in the parent, then the process forked."""
    client = Client(served.address, timeout_s=10)
    assert client.predict("linear", {"x": np.ones(1, np.float32)}).outputs["y"].tolist() == [3.5]
    pid = os.fork()
    if pid == 0:  # the child: exit code 0 only if the inherited client works here
        ok = False
        try:
            ok = client.predict("linear", {"x": np.ones(2, np.float32)}).outputs["y"].tolist() == [3.5, 3.5]
        except BaseException:  # noqa: BLE001 - the child must never return into pytest
            pass
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert client.predict("linear", {"x": np.zeros(1, np.float32)}).outputs["y"].tolist() == [3.0]
    client.close()


def packb(value: object) -> bytes:
    return msgpack.packb(value)


@pytest.mark.parametrize("frames", [
    [b"TFB05", b"\x01", packb({"id": 1, "model": "linear", "version": "two", "timeout_ms": 9, "inputs": []})],
    [b"TFB05", b"\x01", packb({"id": 2, "model": "linear", "signature": ["x"], "timeout_ms": 9, "inputs": []})],
    [b"TFB05", b"\x01", packb({"id": 3, "model": "linear", "timeout_ms": "soon",
                                "inputs": [["x", "float32", [1]]]}), b"\x00" * 4],
    [b"TFB05", b"\x01", packb({"id": 4, "model": "linear", "timeout_ms": 9, "inputs": [["x", "float32", [2]]]}),
     b"\x00"],
    [b"TFB05", b"\x05", packb({"id": 5, "model": "linear", "version": {"a": 1}})],
    [b"TFB05", protocol.READY, packb({"id": 6})],
    [b"TFB99", b"\x01", b"\x80"],
])
def test_malformed_wire_messages_get_errors_and_the_broker_keeps_serving(served: BrokerProcess,
                                                                          frames: list[bytes]) -> None:
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(served.address)
    try:
        sock.send_multipart(frames)
        assert sock.poll(10_000), "the broker answers a malformed message"
        reply = protocol.decode(sock.recv_multipart(), protocol.BROKER_TO_CLIENT)
        assert reply.command == protocol.ERROR
        assert reply.header.code == 400
        assert reply.header.id == protocol.salvage_id(frames), "the error names the request when it can"
    finally:
        sock.close()
        context.term()
    assert served.predict("linear", {"instances": [2.0]}).json() == {"predictions": [4.0]}


def test_a_bundle_is_answered_member_by_member_and_a_malformed_member_fails_alone(served: BrokerProcess) -> None:
    """A BUNDLE of two good requests around a malformed one and a nested BUNDLE: the good ones
    are answered (together, as the broker coalesces what it has for a client), the others get
    a 400 naming their id, and nothing else."""
    def predict(request_id: int, value: float) -> list[Any]:
        return encode_predict(request_id, "linear", {"x": np.array([value], np.float32)}, version=None, label=None,
                              signature_name="serving_default", timeout_s=10)[1:]

    bad = [protocol.REQUEST, packb({"id": 2, "model": "linear", "timeout_ms": 9, "inputs": [["x", "float32", [2]]]}),
           b"\x00"]  # 1 byte for 2 floats
    nested = [protocol.BUNDLE, protocol.encode_header(protocol.Bundle(
        commands=protocol.HEARTBEAT, headers=[protocol.encode_header(protocol.Heartbeat())], counts=[0]))]
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(served.address)
    answers: dict[int | None, Any] = {}
    try:
        sock.send_multipart(protocol.bundle([predict(1, 2.0), bad, nested, predict(4, 6.0)]))
        while len(answers) < 4 and sock.poll(10_000):
            for request_id, answer in read_answers(sock.recv_multipart()):
                answers[request_id] = answer
    finally:
        sock.close()
        context.term()
    assert prediction(answers[1]).outputs["y"].tolist() == [4.0]  # linear version 2: 0.5x + 3
    assert prediction(answers[4]).outputs["y"].tolist() == [6.0]
    assert answers[2].command == protocol.ERROR and answers[2].header.code == 400
    assert answers[None].command == protocol.ERROR and "not one this socket takes" in answers[None].header.message
    assert served.predict("linear", {"instances": [2.0]}).json() == {"predictions": [4.0]}


def test_what_a_client_has_ready_at_once_travels_coalesced(served: BrokerProcess) -> None:
    """Requests made in one loop iteration go as one message: the broker's own count of client
    messages grows by less than its count of requests, and every answer is right."""
    async def burst() -> list[float]:
        async with AsyncClient(served.address, timeout_s=10) as client:
            await client.predict("linear", {"x": np.array([0.0], np.float32)})  # connected
            results = await asyncio.gather(*[client.predict("linear", {"x": np.array([float(i)], np.float32)})
                                             for i in range(64)])
            return [float(r.outputs["y"][0]) for r in results]

    with Client(served.address) as client:
        before = client.stats()
        assert asyncio.run(burst()) == [0.5 * i + 3.0 for i in range(64)]
        after = client.stats()
    requests = after["requests"] - before["requests"]
    messages = after["client_messages"] - before["client_messages"]
    assert requests == 65
    assert messages <= 10, f"{requests} requests came in {messages} messages"
