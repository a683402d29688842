"""TF Serving's gRPC API, called by TF Serving's own client (tensorflow-serving-api stubs and
tf.make_tensor_proto / tf.make_ndarray, in a child with TensorFlow): every answer equal to
the REST API's and to TensorFlow's own, TF Serving's status codes, deadlines and cancellation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
from google.protobuf import json_format

from frontend import grpc_messages as pb
from tests.conftest import ROOT, BrokerProcess, reference_outputs, serving

CLIENT = ROOT / "tests" / "system" / "tfs_client.py"


@pytest.fixture(scope="module")
def broker(test_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    models = {name: test_models / name for name in ("half_plus_two", "mlp", "typed", "slow", "linear")}
    # One batch in flight: a request waits in the broker's queue while the slow model runs.
    args = ["--enable_grpc_healthcheck_service=true", "--batches_in_flight=1", "--max_request_body_bytes=1000000"]
    with serving(tmp_path_factory.mktemp("grpc"), models, args, frontends=2) as started:
        yield started


def tfs(broker: BrokerProcess, *calls: dict[str, Any]) -> list[dict[str, Any]]:
    """The calls made by TF Serving's client, in order (``background`` ones not waited for)."""
    result = subprocess.run([sys.executable, str(CLIENT), f"127.0.0.1:{broker.grpc_port}"],
                            input=json.dumps(list(calls)), capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    answers: list[dict[str, Any]] = json.loads(result.stdout)
    return answers


def predict(model: str, inputs: dict[str, Any], **spec: Any) -> dict[str, Any]:
    extra = {k: spec.pop(k) for k in ("timeout_s", "cancel_after_s", "background") if k in spec}
    return {"rpc": "Predict", "request": {"model_spec": {"name": model, **spec}}, "inputs": inputs, **extra}


def tensor(array: np.ndarray, *, content: bool = True) -> dict[str, Any]:
    return {"values": array.tolist(), "dtype": array.dtype.name, "content": content}


def test_predict_equals_rest_and_tensorflow_in_both_encodings(broker: BrokerProcess, test_models: Path) -> None:
    rng = np.random.default_rng(3)
    batches = [rng.standard_normal((rows, 8)).astype(np.float32) for rows in (1, 3, 7)]
    expected = reference_outputs(test_models / "mlp" / "1", [{"x": x} for x in batches])
    calls = [predict("mlp", {"x": tensor(x, content=content)}) for x in batches for content in (True, False)]
    answers = tfs(broker, *calls)
    for i, x in enumerate(batches):
        rest = np.array(broker.predict("mlp", {"inputs": {"x": x.tolist()}}).json()["outputs"], np.float32)
        for answer in answers[2 * i:2 * i + 2]:
            assert answer["code"] == "OK", answer
            y = answer["outputs"]["y"]
            assert y["dtype"] == "float32" and not y["content"]  # TF Serving's default: typed fields
            np.testing.assert_array_equal(np.array(y["values"], np.float32), rest)
            np.testing.assert_allclose(np.array(y["values"], np.float32), expected[i]["y"], rtol=1e-5, atol=1e-6)
        assert answers[2 * i]["response"]["model_spec"] == {"name": "mlp", "version": "1",
                                                            "signature_name": "serving_default"}


def test_one_typed_value_fills_the_shape_and_every_dtype_answers_as_rest(broker: BrokerProcess) -> None:
    filled = predict("linear", {"x": {**tensor(np.array([4.0, 4.0, 4.0], np.float32), content=False), "fill": True}})
    inputs = {"f32": np.array([1.5, -2.25], np.float32), "f64": np.array([0.1, 1e300]), "i32": np.array([7, -8], np.int32),
              "i64": np.array([1 << 40, -3]), "flag": np.array([True, False])}
    typed = {name: tensor(array, content=name != "f64") for name, array in inputs.items()}
    typed["s"] = {"values": ["hé", ""], "dtype": "string"}
    answers = tfs(broker, filled, predict("typed", typed))
    assert answers[0]["outputs"]["y"]["values"] == [5.0, 5.0, 5.0]  # version 2: 0.5 x + 3, x = 4 everywhere
    rest = broker.predict("typed", {"inputs": {**{k: v.tolist() for k, v in inputs.items()}, "s": ["hé", ""]}}).json()
    outputs = answers[1]["outputs"]
    for name in inputs:
        assert outputs[f"{name}_out"]["values"] == rest["outputs"][f"{name}_out"], name
    assert outputs["s_bytes"]["values"] == ["hé", ""]


def test_output_filter_answers_only_the_outputs_asked_for(broker: BrokerProcess) -> None:
    inputs = {"f32": tensor(np.array([1.0], np.float32)), "f64": tensor(np.array([1.0])),
              "i32": tensor(np.array([1], np.int32)), "i64": tensor(np.array([1])),
              "flag": tensor(np.array([True])), "s": {"values": ["a"], "dtype": "string"}}
    asked, unknown = tfs(broker, {**predict("typed", inputs), "request": {
        "model_spec": {"name": "typed"}, "output_filter": ["f32_out", "s_bytes"]}},
        {**predict("typed", inputs), "request": {"model_spec": {"name": "typed"}, "output_filter": ["nope"]}})
    assert sorted(asked["outputs"]) == ["f32_out", "s_bytes"]
    assert unknown["code"] == "INVALID_ARGUMENT" and "output tensor alias not found in signature: nope" in unknown["details"]


def examples(*values: float) -> dict[str, Any]:
    return {"example_list": {"examples": [{"features": {"feature": {"x": {"float_list": {"value": [v]}}}}}
                                          for v in values]}}


def test_classify_regress_and_multi_inference_answer_as_rest(broker: BrokerProcess) -> None:
    spec = {"name": "half_plus_two", "signature_name": "classify_x_to_y"}
    regress_spec = {"name": "half_plus_two", "signature_name": "regress_x_to_y"}
    with_context = {"example_list_with_context": {
        "context": {"features": {"feature": {"x": {"float_list": {"value": [4.0]}}}}},
        "examples": [{}, {"features": {"feature": {"x": {"float_list": {"value": [2.0]}}}}}]}}
    classify, regress, context, multi = tfs(
        broker,
        {"rpc": "Classify", "request": {"model_spec": spec, "input": examples(1.0, 2.0)}},
        {"rpc": "Regress", "request": {"model_spec": regress_spec, "input": examples(1.0, 5.0)}},
        {"rpc": "Regress", "request": {"model_spec": regress_spec, "input": with_context}},
        {"rpc": "MultiInference", "request": {"input": examples(3.0), "tasks": [
            {"model_spec": spec, "method_name": "tensorflow/serving/classify"},
            {"model_spec": regress_spec, "method_name": "tensorflow/serving/regress"}]}})
    rest = broker.http.post("/v1/models/half_plus_two:classify", json={
        "signature_name": "classify_x_to_y", "examples": [{"x": 1.0}, {"x": 2.0}]}).json()["results"]
    assert [[[c.get("label", ""), c["score"]] for c in row["classes"]]
            for row in classify["response"]["result"]["classifications"]] == rest == [[["", 2.5]], [["", 3.0]]]
    assert classify["response"]["model_spec"]["version"] == "123"
    rest = broker.http.post("/v1/models/half_plus_two:regress", json={
        "signature_name": "regress_x_to_y", "examples": [{"x": 1.0}, {"x": 5.0}]}).json()["results"]
    assert [r["value"] for r in regress["response"]["result"]["regressions"]] == rest == [2.5, 4.5]
    assert [r["value"] for r in context["response"]["result"]["regressions"]] == [4.0, 3.0]
    results = multi["response"]["results"]
    assert results[0]["classification_result"]["classifications"][0]["classes"][0]["score"] == 3.5
    assert results[1]["regression_result"]["regressions"][0]["value"] == 3.5
    assert [r["model_spec"]["signature_name"] for r in results] == ["classify_x_to_y", "regress_x_to_y"]


def test_metadata_and_status_equal_rest(broker: BrokerProcess) -> None:
    metadata, status, by_version, health = tfs(
        broker,
        {"rpc": "GetModelMetadata", "request": {"model_spec": {"name": "half_plus_two"},
                                                "metadata_field": ["signature_def"]}},
        {"rpc": "GetModelStatus", "request": {"model_spec": {"name": "half_plus_two"}}},
        {"rpc": "GetModelStatus", "request": {"model_spec": {"name": "mlp", "version": 1}}},
        *[{"rpc": "HealthCheck", "request": {"service": s}} for s in ("tensorflow.serving.PredictionService",)])
    assert metadata["type_url"] == "type.googleapis.com/tensorflow.serving.SignatureDefMap"
    rest = broker.http.get("/v1/models/half_plus_two/metadata").json()["metadata"]["signature_def"]
    from_rest = json_format.MessageToDict(json_format.ParseDict(rest, pb.SignatureDefMap()),
                                          preserving_proto_field_name=True)
    assert metadata["signature_def"] == from_rest
    assert metadata["response"]["model_spec"] == {"name": "half_plus_two", "version": "123"}
    assert status["response"]["model_version_status"] == [{"version": "123", "state": "AVAILABLE", "status": {}}]
    assert by_version["response"]["model_version_status"][0]["version"] == "1"
    assert health["response"] == {"status": "SERVING"}


def test_errors_carry_tf_servings_codes_and_the_rest_apis_texts(broker: BrokerProcess) -> None:
    x = tensor(np.array([1.0], np.float32))
    answers = tfs(
        broker,
        predict("nosuchmodel", {"x": x}),
        predict("linear", {"x": x}, version=9),
        predict("linear", {"z": x}),
        predict("linear", {"x": {"values": ["a"], "dtype": "string"}}),
        predict("linear", {"x": x}, signature_name="nope"),
        predict("linear", {"x": tensor(np.zeros(300_000, np.float32))}),  # 1.2 MB > --max_request_body_bytes
        {"rpc": "GetModelMetadata", "request": {"model_spec": {"name": "linear"}}},
        {"rpc": "GetModelMetadata", "request": {"model_spec": {"name": "linear"}, "metadata_field": ["other"]}})
    codes = [a["code"] for a in answers]
    assert codes == ["NOT_FOUND", "NOT_FOUND", "INVALID_ARGUMENT", "INVALID_ARGUMENT", "INVALID_ARGUMENT",
                     "RESOURCE_EXHAUSTED", "INVALID_ARGUMENT", "INVALID_ARGUMENT"], answers
    for answer, body, suffix in [
            (answers[0], {"inputs": {"x": [1.0]}}, ""), (answers[1], {"inputs": {"x": [1.0]}}, "/versions/9"),
            (answers[2], {"inputs": {"z": [1.0]}}, ""), (answers[3], {"inputs": {"x": ["a"]}}, ""),
            (answers[4], {"inputs": {"x": [1.0]}, "signature_name": "nope"}, "")]:
        model = "nosuchmodel" if answer is answers[0] else "linear"
        assert answer["details"] == broker.predict(model, body, suffix).json()["error"]
    assert "at least one metadata_field" in answers[6]["details"]
    assert "Metadata field other is not supported" in answers[7]["details"]


def test_a_deadline_shorter_than_the_queue_is_answered_and_never_run(broker: BrokerProcess) -> None:
    """The slow model answers how many calls it has run: the expired request is not one."""
    x = tensor(np.array([0.0], np.float32))
    first, late, cancelled, after = tfs(
        broker,
        predict("slow", {"x": x}, background=True),  # runs ~0.3 s; the next ones wait behind it
        predict("slow", {"x": x}, timeout_s=0.1),
        predict("slow", {"x": x}, cancel_after_s=0.05),
        predict("slow", {"x": x}))
    assert late["code"] == "DEADLINE_EXCEEDED" and late["seconds"] < 1.0, late
    assert cancelled["code"] == "CANCELLED", cancelled
    assert first["code"] == after["code"] == "OK"
    runs = after["outputs"]["y"]["values"][0] - first["outputs"]["y"]["values"][0]
    assert runs == 1, f"{runs - 1} requests the client gave up on reached the model"


def test_tensor_content_answers_with_the_servers_flag(test_models: Path, tmp_path: Path) -> None:
    with serving(tmp_path, {"linear": test_models / "linear"},
                 ["--enable_serialization_as_tensor_content=true"]) as started:
        [answer] = tfs(started, predict("linear", {"x": tensor(np.array([1.0, 2.0], np.float32), content=False)}))
    assert answer["outputs"]["y"] == {"values": [3.5, 4.0], "dtype": "float32", "content": True}  # version 2


def test_reload_config_request_replaces_the_served_models(test_models: Path, tmp_path: Path) -> None:
    def config(*names: str) -> dict[str, Any]:
        return {"model_config_list": {"config": [
            {"name": name, "base_path": str(test_models / name), "model_platform": "tensorflow"} for name in names]}}

    with serving(tmp_path, {"linear": test_models / "linear"}) as started:
        reload, bad = tfs(started,
                          {"rpc": "HandleReloadConfigRequest", "request": {"config": config("linear", "half_plus_two")}},
                          {"rpc": "HandleReloadConfigRequest", "request": {"config": {"model_config_list": {
                              "config": [{"name": "a/b", "base_path": "/x"}]}}}})
        assert reload["code"] == "OK" and reload["response"] == {"status": {}}, reload
        started.wait_available(["linear", "half_plus_two"])
        assert started.predict("half_plus_two", {"instances": [1.0]}).json() == {"predictions": [2.5]}
        assert bad["code"] == "INVALID_ARGUMENT" and "model config not reloaded" in bad["details"], bad
        [removed] = tfs(started, {"rpc": "HandleReloadConfigRequest", "request": {"config": config("half_plus_two")}})
        assert removed["code"] == "OK"
        assert "linear removed" in started.log() or "model linear removed" in started.log()
