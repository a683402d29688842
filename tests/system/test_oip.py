"""The Open Inference Protocol (KServe v2) beside TF Serving's API, called by tritonclient as
users call it (HTTP with binary tensors, its default, and JSON; gRPC with raw contents, its
default, and typed contents; streams): every answer equal to TF Serving's REST answer for
the same request and to TensorFlow's own, the protocol's errors and codes, deadlines."""

from __future__ import annotations

import base64
import json
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from tests.conftest import ROOT, BrokerProcess, make_model_config, reference_outputs, stop_and_check, wait_for


@pytest.fixture(scope="module")
def broker(test_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    tmp = tmp_path_factory.mktemp("oip")
    models = {name: test_models / name for name in ("mlp", "typed", "slow", "two_io")}
    config = make_model_config(models).replace("model_config_list {", f"""model_config_list {{
  config {{ name: "linear" base_path: "{test_models / 'linear'}" model_platform: "tensorflow"
           model_version_policy {{ all {{}} }} version_labels {{ key: "stable" value: 2 }} }}""")
    (tmp / "models.config").write_text(config)
    started = BrokerProcess(tmp, [f"--model_config_file={tmp / 'models.config'}",
                                  "--enable_grpc_healthcheck_service=true", "--enable_model_control=true",
                                  # One batch in flight: a request waits in the queue while the slow model runs.
                                  "--batches_in_flight=1"],
                           frontends=2)
    try:
        started.wait_available([*models, "linear"])
        yield started
    finally:
        stop_and_check(started)


@pytest.fixture(scope="module")
def http(broker: BrokerProcess) -> Iterator[triton_http.InferenceServerClient]:
    client = triton_http.InferenceServerClient(url=f"127.0.0.1:{broker.port}", network_timeout=30.0)
    yield client
    client.close()


@pytest.fixture(scope="module")
def rpc(broker: BrokerProcess) -> Iterator[triton_grpc.InferenceServerClient]:
    client = triton_grpc.InferenceServerClient(url=f"127.0.0.1:{broker.grpc_port}")
    yield client
    client.close()


def http_inputs(arrays: dict[str, np.ndarray], *, binary: bool) -> list[triton_http.InferInput]:
    inputs = []
    for name, array in arrays.items():
        given = triton_http.InferInput(name, list(array.shape), _datatype(array))
        given.set_data_from_numpy(array, binary_data=binary)
        inputs.append(given)
    return inputs


def grpc_inputs(arrays: dict[str, np.ndarray]) -> list[triton_grpc.InferInput]:
    inputs = []
    for name, array in arrays.items():
        given = triton_grpc.InferInput(name, list(array.shape), _datatype(array))
        given.set_data_from_numpy(array)  # raw_input_contents, tritonclient's way
        inputs.append(given)
    return inputs


def _datatype(array: np.ndarray) -> str:
    return {"float32": "FP32", "float64": "FP64", "int32": "INT32", "int64": "INT64", "bool": "BOOL",
            "object": "BYTES"}[array.dtype.name]


def test_health_and_metadata_answer_both_ways(broker: BrokerProcess, http: triton_http.InferenceServerClient,
                                             rpc: triton_grpc.InferenceServerClient) -> None:
    assert http.is_server_live() and http.is_server_ready()
    assert rpc.is_server_live() and rpc.is_server_ready()
    assert http.is_model_ready("mlp") and rpc.is_model_ready("mlp")
    assert http.is_model_ready("linear", "1") and rpc.is_model_ready("linear", "stable")
    assert not http.is_model_ready("nope")  # 404
    with pytest.raises(InferenceServerException, match="not found"):
        rpc.is_model_ready("nope")
    assert "binary_tensor_data" in http.get_server_metadata()["extensions"]
    assert rpc.get_server_metadata().name == "tfbroker"
    expected = {"name": "mlp", "versions": ["1"], "platform": "tensorflow_savedmodel",
                "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 8]}],
                "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}]}
    assert http.get_model_metadata("mlp") == expected
    assert rpc.get_model_metadata("mlp", as_json=True) == {**expected, "inputs": [
        {**t, "shape": [str(d) for d in t["shape"]]} for t in expected["inputs"]], "outputs": [
        {**t, "shape": [str(d) for d in t["shape"]]} for t in expected["outputs"]]}
    assert http.get_model_metadata("linear")["versions"] == ["2", "1"]
    ready = broker.http.get("/v2/health/ready")
    assert ready.status_code == 200 and ready.json() == {"ready": True}


def test_infer_equals_tf_serving_rest_and_tensorflow_every_way(broker: BrokerProcess, test_models: Path,
                                                              http: triton_http.InferenceServerClient,
                                                              rpc: triton_grpc.InferenceServerClient) -> None:
    rng = np.random.default_rng(11)
    batches = [rng.standard_normal((rows, 8)).astype(np.float32) for rows in (1, 3, 32)]
    expected = reference_outputs(test_models / "mlp" / "1", [{"x": x} for x in batches])
    for x, reference in zip(batches, expected):
        rest = np.array(broker.predict("mlp", {"inputs": {"x": x.tolist()}}).json()["outputs"], np.float32)
        answers = []
        for binary in (True, False):
            outputs = [triton_http.InferRequestedOutput("y", binary_data=binary)]
            result = http.infer("mlp", http_inputs({"x": x}, binary=binary), outputs=outputs, request_id="r7")
            assert result.get_response()["id"] == "r7" and result.get_response()["model_version"] == "1"
            answers.append(result.as_numpy("y"))
        answers.append(rpc.infer("mlp", grpc_inputs({"x": x})).as_numpy("y"))
        for answer in answers:
            assert answer.dtype == np.float32 and answer.shape == (len(x), 4)
            np.testing.assert_array_equal(answer, rest)
            np.testing.assert_allclose(answer, reference["y"], rtol=1e-5, atol=1e-6)


def test_every_datatype_round_trips_as_tf_serving_answers(broker: BrokerProcess,
                                                          http: triton_http.InferenceServerClient,
                                                          rpc: triton_grpc.InferenceServerClient) -> None:
    arrays = {"f32": np.array([1.5, -2.25], np.float32), "f64": np.array([0.1, 1e300]),
              "i32": np.array([7, -8], np.int32), "i64": np.array([1 << 40, -3]),
              "flag": np.array([True, False]), "s": np.array(["hé".encode(), b""], dtype=object)}
    rest = broker.predict("typed", {"inputs": {**{k: v.tolist() for k, v in arrays.items() if k != "s"},
                                               "s": ["hé", ""]}}).json()["outputs"]
    results = [http.infer("typed", http_inputs(arrays, binary=True)),
               http.infer("typed", http_inputs(arrays, binary=False)),
               rpc.infer("typed", grpc_inputs(arrays))]
    for result in results:
        for name in ("f32", "f64", "i32", "i64", "flag"):
            answer = result.as_numpy(f"{name}_out")
            assert answer.tolist() == rest[f"{name}_out"], name
        assert [bytes(v) for v in result.as_numpy("s_bytes")] == ["hé".encode(), b""]


def test_binary_framing_byte_for_byte(broker: BrokerProcess) -> None:
    """The binary tensor data extension as its spec draws it, written and read by hand."""
    x = np.arange(16, dtype=np.float32).reshape(2, 8) / 8
    header = json.dumps({"id": "by-hand", "inputs": [{"name": "x", "shape": [2, 8], "datatype": "FP32",
                                                        "parameters": {"binary_data_size": x.nbytes}}],
                         "outputs": [{"name": "y", "parameters": {"binary_data": True}}]}).encode()
    response = broker.http.post("/v2/models/mlp/infer", content=header + x.tobytes(),
                                headers={"Inference-Header-Content-Length": str(len(header)),
                                         "Content-Type": "application/octet-stream"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    length = int(response.headers["inference-header-content-length"])
    head = json.loads(response.content[:length])
    assert head["id"] == "by-hand" and head["model_name"] == "mlp"
    (output,) = head["outputs"]
    assert output == {"name": "y", "datatype": "FP32", "shape": [2, 4], "parameters": {"binary_data_size": 32}}
    assert len(response.content) == length + 32
    y = np.frombuffer(response.content[length:], "<f4").reshape(2, 4)
    rest = broker.predict("mlp", {"instances": x.tolist()}).json()["predictions"]
    np.testing.assert_array_equal(y, np.array(rest, np.float32))
    # BYTES: a 4-byte little-endian length before each element, both ways.
    words = [b"ab", b"", "hé".encode()]
    blob = b"".join(struct.pack("<I", len(w)) + w for w in words)
    header = json.dumps({"inputs": [
        {"name": "s", "shape": [3], "datatype": "BYTES", "parameters": {"binary_data_size": len(blob)}},
        *[{"name": n, "shape": [3], "datatype": d, "data": v} for n, d, v in (
            ("f32", "FP32", [1, 2, 3]), ("f64", "FP64", [1, 2, 3]), ("i32", "INT32", [1, 2, 3]),
            ("i64", "INT64", [1, 2, 3]), ("flag", "BOOL", [True, False, True]))]],
        "parameters": {"binary_data_output": True}}).encode()
    response = broker.http.post("/v2/models/typed/infer", content=header + blob,
                                headers={"Inference-Header-Content-Length": str(len(header))})
    assert response.status_code == 200, response.text
    length = int(response.headers["inference-header-content-length"])
    outputs = json.loads(response.content[:length])["outputs"]
    at = length
    for output in outputs:
        size = output["parameters"]["binary_data_size"]
        if output["name"] == "s_bytes":
            assert response.content[at:at + size] == blob
        at += size
    assert at == len(response.content)


def test_json_data_may_be_nested_or_flat(broker: BrokerProcess) -> None:
    flat = {"inputs": [{"name": "a", "shape": [2, 2], "datatype": "FP32", "data": [1, 2, 3, 4]},
                       {"name": "b", "shape": [2], "datatype": "INT64", "data": [5, 6]}]}
    nested = {"inputs": [{**flat["inputs"][0], "data": [[1, 2], [3, 4]]}, flat["inputs"][1]]}
    answers = [broker.http.post("/v2/models/two_io/infer", json=body) for body in (flat, nested)]
    assert all(a.status_code == 200 for a in answers), answers[0].text
    assert answers[0].json()["outputs"] == answers[1].json()["outputs"]
    rest = broker.predict("two_io", {"inputs": {"a": [[1, 2], [3, 4]], "b": [5, 6]}}).json()["outputs"]
    for output in answers[0].json()["outputs"]:
        expected = rest[output["name"]]  # TF Serving writes a *_bytes output in base64; the protocol as text
        expected = [base64.b64decode(v["b64"]).decode() if isinstance(v, dict) else v for v in expected]
        assert np.array(output["data"]).reshape(output["shape"]).tolist() == expected


@pytest.mark.parametrize(("body", "status", "text"), [
    ({"inputs": [{"name": "x", "shape": [1, 8], "datatype": "FP64", "data": [0.0] * 8}]}, 400, "type double"),
    ({"inputs": [{"name": "x", "shape": [1, 7], "datatype": "FP32", "data": [0.0] * 7}]}, 400, "shape"),
    ({"inputs": [{"name": "x", "shape": [1, 8], "datatype": "FP32", "data": [0.0] * 7}]}, 400, "holds 8 elements"),
    ({"inputs": [{"name": "x", "shape": [1, 8], "datatype": "FP32", "data": [None] * 8}]}, 400, "numbers"),
    ({"inputs": [{"name": "x", "shape": [1, 8], "datatype": "FP99", "data": [0.0] * 8}]}, 400, "datatype"),
    ({"inputs": [{"name": "z", "shape": [1, 8], "datatype": "FP32", "data": [0.0] * 8}]}, 400, "z"),
    ({"inputs": []}, 400, "inputs"),
    ({"inputs": [{"name": "x", "shape": [1, 8], "datatype": "FP32", "data": [0.0] * 8}],
      "outputs": [{"name": "nope"}]}, 400, "nope"),
])
def test_bad_requests_get_400_with_the_reason(broker: BrokerProcess, body: dict[str, Any], status: int,
                                              text: str) -> None:
    response = broker.http.post("/v2/models/mlp/infer", json=body)
    assert response.status_code == status, response.text
    assert text in response.json()["error"]


def test_unknown_models_versions_and_paths_are_404(broker: BrokerProcess) -> None:
    body = {"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}]}
    for path in ("/v2/models/nope/infer", "/v2/models/linear/versions/9/infer", "/v2/models/nope",
                 "/v2/models/linear/versions/9", "/v2/models/nope/ready", "/v2/nothing"):
        response = broker.http.post(path, json=body) if path.endswith("infer") else broker.http.get(path)
        assert response.status_code == 404, (path, response.text)
        assert response.json()["error"]
    assert broker.http.post("/v2/models/mlp/infer", content=b"{not json").status_code == 400
    # A label the model does not have is a bad argument, as in TF Serving.
    unknown = broker.http.post("/v2/models/linear/versions/x/infer", json=body)
    assert unknown.status_code == 400 and "label: x" in unknown.json()["error"]
    # A label stands for a version, as in TF Serving's /labels/ paths.
    answer = broker.http.post("/v2/models/linear/versions/stable/infer", json=body).json()
    assert answer["model_version"] == "2" and answer["outputs"][0]["data"] == [3.5]
    answer = broker.http.post("/v2/models/linear/versions/1/infer", json=body).json()
    assert answer["model_version"] == "1" and answer["outputs"][0]["data"] == [2.5]


def test_grpc_errors_carry_the_protocols_codes(rpc: triton_grpc.InferenceServerClient) -> None:
    x = np.zeros((1, 8), np.float32)
    cases = [("nope", {"x": x}, grpc.StatusCode.NOT_FOUND),
             ("mlp", {"x": x.astype(np.float64)}, grpc.StatusCode.INVALID_ARGUMENT),
             ("mlp", {"x": np.zeros((1, 7), np.float32)}, grpc.StatusCode.INVALID_ARGUMENT)]
    for model, arrays, code in cases:
        with pytest.raises(InferenceServerException) as caught:
            rpc.infer(model, grpc_inputs(arrays))
        assert caught.value.status() == f"StatusCode.{code.name}", caught.value
    slow = np.ones(1, np.float32)
    with pytest.raises(InferenceServerException) as caught:
        rpc.infer("slow", grpc_inputs({"x": slow}), client_timeout=0.001)
    assert caught.value.status() == "StatusCode.DEADLINE_EXCEEDED"


def test_a_stream_answers_every_request_in_order(rpc: triton_grpc.InferenceServerClient) -> None:
    answers: list[Any] = []
    done = __import__("threading").Event()
    count = 20

    def collect(result: Any, error: Any) -> None:
        answers.append(error if error is not None else result)
        if len(answers) == count:
            done.set()

    rpc.start_stream(callback=collect)
    try:
        for i in range(count):
            model = "nope" if i == 7 else "linear"
            rpc.async_stream_infer(model, grpc_inputs({"x": np.array([float(i)], np.float32)}), request_id=str(i))
        assert done.wait(60), f"{len(answers)} of {count} answers"
    finally:
        rpc.stop_stream()
    for i, answer in enumerate(answers):
        if i == 7:
            assert isinstance(answer, InferenceServerException) and "nope" in str(answer)
            continue
        assert answer.get_response().id == str(i)
        assert answer.as_numpy("y").tolist() == [0.5 * i + 3.0]


def test_every_answer_carries_a_date_header(broker: BrokerProcess) -> None:
    """TF Serving's predict (answered below ASGI by the frontend's own protocol), its other calls
    and the protocol's (through ASGI): the same headers."""
    answers = [broker.predict("mlp", {"instances": [[0.0] * 8]}), broker.http.get("/v1/models/mlp"),
               broker.http.get("/v2/models/mlp")]
    for answer in answers:
        assert answer.status_code == 200 and "date" in answer.headers, answer.headers


def test_the_model_repository_lists_unloads_and_loads(broker: BrokerProcess, http: triton_http.InferenceServerClient,
                                                      rpc: triton_grpc.InferenceServerClient) -> None:
    """tritonclient's repository calls, on the control channel's load and unload (the broker runs
    with --enable_model_control)."""
    index = {(m["name"], m["version"]): m["state"] for m in http.get_model_repository_index()}
    assert index[("two_io", "1")] == "READY" and index[("linear", "1")] == "READY"
    assert {m.name for m in rpc.get_model_repository_index().models} >= {"mlp", "two_io", "linear"}
    ready = broker.http.post("/v2/repository/index", json={"ready": True}).json()
    assert ready and all(m["state"] == "READY" for m in ready)
    body = {"inputs": [{"name": "a", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]},
                       {"name": "b", "shape": [1], "datatype": "INT64", "data": [3]}]}
    rpc.unload_model("two_io")
    assert broker.http.post("/v2/models/two_io/infer", json=body).status_code == 404  # at once
    assert not http.is_model_ready("two_io")
    wait_for(lambda: {m["state"] for m in http.get_model_repository_index() if m["name"] == "two_io"}
             == {"UNAVAILABLE"}, 60, "two_io's worker to go")
    assert http.is_server_ready()  # a model unloaded on purpose does not make the server unready
    http.load_model("two_io")
    wait_for(lambda: http.is_model_ready("two_io"), 120, "two_io to load again")
    assert broker.http.post("/v2/models/two_io/infer", json=body).status_code == 200
    with pytest.raises(InferenceServerException, match="no_such_model"):
        http.load_model("no_such_model")


def test_kserve_s_own_clients_get_the_same_answers(broker: BrokerProcess) -> None:
    """KServe's SDK clients (REST with JSON and binary tensors, gRPC), in a child."""
    inputs = {"a": ["FP32", [[1.0, 2.0], [3.0, 4.0]]], "b": ["INT64", [5, 6]]}
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "system" / "kserve_client.py"), broker.base_url,
                             f"127.0.0.1:{broker.grpc_port}", "two_io"], input=json.dumps(inputs), cwd=ROOT,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    answers = json.loads(result.stdout)
    rest = broker.predict("two_io", {"inputs": {"a": [[1.0, 2.0], [3.0, 4.0]], "b": [5, 6]}}).json()["outputs"]
    for key in ("rest json", "rest binary", "grpc"):
        answer = answers[key]
        # (KServe's REST client does not read model_version from the answer; its gRPC client does.)
        assert answer["ready"] and answer["id"] == "kserve-1", (key, answer)
        assert answer["version"] == ("1" if key == "grpc" else None), (key, answer)
        assert answer["outputs"]["sum"] == rest["sum"], (key, answer)
        labels = [base64.b64decode(v["b64"]).decode() for v in rest["label_bytes"]]  # (TF Serving: *_bytes in b64)
        assert answer["outputs"]["label_bytes"] == labels, (key, answer)
    assert "no_such_model" in answers["rest error"] and "no_such_model" in answers["grpc error"], answers


def test_a_deadline_or_a_cancel_over_grpc_takes_the_request_out_of_the_queue(
        rpc: triton_grpc.InferenceServerClient) -> None:
    """As TF Serving's gRPC API: the slow model answers how many calls it has run, and neither the
    request past its deadline nor the cancelled one is among them."""
    import queue

    answers: queue.Queue[Any] = queue.Queue()
    x = grpc_inputs({"x": np.zeros(1, np.float32)})
    rpc.async_infer("slow", x, lambda result, error: answers.put(("first", result, error)))  # runs a while
    cancelled = rpc.async_infer("slow", x, lambda result, error: answers.put(("cancelled", result, error)))
    with pytest.raises(InferenceServerException) as late:
        rpc.infer("slow", x, client_timeout=0.1)
    assert late.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    cancelled.cancel()
    after = rpc.infer("slow", x).as_numpy("y")[0]
    got = {name: (result, error) for name, result, error in (answers.get(timeout=60) for _ in range(2))}
    first, error = got["first"]
    assert error is None, error
    assert got["cancelled"][1] is not None and "CANCELLED" in str(got["cancelled"][1].status()), got["cancelled"]
    runs = after - first.as_numpy("y")[0]
    assert runs == 1, f"{runs - 1} requests the client gave up on reached the model"


def test_statistics_count_what_ran_for_tritonclient_both_ways(broker: BrokerProcess,
                                                              http: triton_http.InferenceServerClient,
                                                              rpc: triton_grpc.InferenceServerClient) -> None:
    """tritonclient's get_inference_statistics over REST and gRPC, from the broker's counters:
    three requests of two rows, one at a time, are three batches of two rows each."""
    assert "statistics" in http.get_server_metadata()["extensions"]

    def linear_1(stats: dict[str, Any]) -> dict[str, Any]:
        [entry] = stats["model_stats"]
        assert (entry["name"], entry["version"]) == ("linear", "1")
        return entry

    def count(entry: dict[str, Any], *path: str) -> int:
        node: Any = entry
        for key in path:
            node = node.get(key, 0) if isinstance(node, dict) else 0
        return int(node or 0)

    before = linear_1(http.get_inference_statistics("linear", "1"))
    body = {"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1.0, 2.0]}]}
    for _ in range(3):
        assert broker.http.post("/v2/models/linear/versions/1/infer", json=body).status_code == 200
    after = linear_1(http.get_inference_statistics("linear", "1"))
    assert count(after, "inference_count") - count(before, "inference_count") == 6
    assert count(after, "execution_count") - count(before, "execution_count") == 3
    for stage in ("success", "queue", "compute_input", "compute_infer", "compute_output"):
        assert count(after, "inference_stats", stage, "count") - count(before, "inference_stats", stage, "count") == 3
        assert count(after, "inference_stats", stage, "ns") > count(before, "inference_stats", stage, "ns")
    success = count(after, "inference_stats", "success", "ns")
    assert success >= count(after, "inference_stats", "queue", "ns") + count(after, "inference_stats", "compute_infer", "ns")
    [size_two] = [b for b in after["batch_stats"] if int(b["batch_size"]) == 2]
    assert count(size_two, "compute_infer", "count") >= 3
    assert count(after, "last_inference") >= count(before, "last_inference") and count(after, "last_inference") > 0
    # The same counts over gRPC (tritonclient's JSON spells uint64 as strings: count() reads both).
    over_grpc = linear_1(rpc.get_inference_statistics("linear", "1", as_json=True))
    assert count(over_grpc, "execution_count") == count(after, "execution_count")
    assert count(over_grpc, "inference_stats", "compute_infer", "ns") == count(after, "inference_stats", "compute_infer", "ns")
    # A label, every version of a model, every model; an unknown one is NOT_FOUND both ways.
    assert [s["version"] for s in http.get_inference_statistics("linear", "stable")["model_stats"]] == ["2"]
    assert [s["version"] for s in http.get_inference_statistics("linear")["model_stats"]] == ["1", "2"]
    assert {s["name"] for s in http.get_inference_statistics()["model_stats"]} >= {"linear", "mlp", "two_io"}
    with pytest.raises(InferenceServerException, match="unknown model"):
        http.get_inference_statistics("nope")
    with pytest.raises(InferenceServerException, match="unknown model") as raised:
        rpc.get_inference_statistics("linear", "9")
    assert raised.value.status() == "StatusCode.NOT_FOUND"
