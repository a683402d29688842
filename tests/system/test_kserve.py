"""ops/kserve/: KServe's own models (its Python SDK) take the manifests whole, they agree with
each other, and the runtime's command serves a model as KServe would run it: readiness on
/v2/health/ready, TF Serving's API and the Open Inference Protocol from one container."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from tests.conftest import ROOT, BrokerProcess, stop_and_check, wait_for

KSERVE = ROOT / "ops" / "kserve"
SDK_CLASSES = {"ClusterServingRuntime": "V1alpha1ClusterServingRuntime", "InferenceService": "V1beta1InferenceService"}


def manifests() -> dict[str, dict[str, Any]]:
    found = {}
    for path in sorted(KSERVE.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                found[doc["kind"]] = doc
    return found


def schema_errors(value: Any, kind: str, where: str) -> list[str]:
    """Where ``value`` is not what KServe's SDK models say ``kind`` is: each model's
    ``openapi_types`` and ``attribute_map`` (KServe's own, and the Kubernetes models it
    builds on), every key known, every value of its type, every required field there."""
    import kserve.models
    import kubernetes.client.models

    if kind.startswith("List["):  # (the Kubernetes models' spelling)
        kind = "list[" + kind[5:]
    elif kind.startswith("Dict["):
        kind = "dict(" + kind[5:-1] + ")"
    if kind.startswith("list["):
        if not isinstance(value, list):
            return [f"{where}: {kind}, got {type(value).__name__}"]
        return [e for i, item in enumerate(value) for e in schema_errors(item, kind[5:-1], f"{where}[{i}]")]
    if kind.startswith("dict("):
        if not isinstance(value, dict):
            return [f"{where}: {kind}, got {type(value).__name__}"]
        inner = kind[5:-1].split(", ", 1)[1]
        return [e for key, item in value.items() for e in schema_errors(item, inner, f"{where}.{key}")]
    primitive = {"str": str, "int": int, "bool": bool, "float": (int, float), "object": object,
                 "datetime": str}.get(kind)
    if primitive is not None:
        if kind == "object" and isinstance(value, (str, int)):
            return []  # an int-or-string (resource quantities, probe ports)
        ok = isinstance(value, primitive) and not (kind in ("int", "float") and isinstance(value, bool))
        return [] if ok else [f"{where}: {kind}, got {value!r}"]
    model = getattr(kserve.models, kind, None) or getattr(kubernetes.client.models, kind, None)
    if model is None:
        return [f"{where}: no model {kind} in KServe's SDK"]
    if not isinstance(value, dict):
        return [f"{where}: {kind} is an object, got {value!r}"]
    by_key = {key: attribute for attribute, key in model.attribute_map.items()}
    errors = [f"{where}.{key}: not a field of {kind}" for key in value if key not in by_key]
    for key, item in value.items():
        if key in by_key:
            errors += schema_errors(item, model.openapi_types[by_key[key]], f"{where}.{key}")
    try:  # the model's own checks (required fields, allowed values), with its fields' raw values
        model(**{by_key[key]: item for key, item in value.items() if key in by_key})
    except (ValueError, TypeError) as exc:
        errors.append(f"{where}: {exc}")
    return errors


def schema_errors_in_child(doc: dict[str, Any], kind: str, where: str) -> list[str]:
    """schema_errors in a child: KServe's SDK registers the protocol's gRPC messages in
    protobuf's default pool, as tritonclient does in this process."""
    code = ("import json, sys; from tests.system.test_kserve import schema_errors; "
            "doc, kind, where = json.load(sys.stdin); print(json.dumps(schema_errors(doc, kind, where)))")
    result = subprocess.run([sys.executable, "-c", code], input=json.dumps([doc, kind, where]), cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    errors: list[str] = json.loads(result.stdout)
    return errors


@pytest.mark.parametrize("kind", sorted(SDK_CLASSES))
def test_kserve_s_own_models_take_every_field(kind: str) -> None:
    doc = manifests()[kind]
    assert schema_errors_in_child(doc, SDK_CLASSES[kind], kind) == []


def test_the_schema_check_can_fail() -> None:
    doc = json.loads(json.dumps(manifests()["ClusterServingRuntime"]))
    doc["spec"]["protocolVersion"] = ["v2"]  # (protocolVersions)
    doc["spec"]["containers"][0]["args"] = "--port=9000"
    del doc["spec"]["containers"][0]["name"]
    errors = schema_errors_in_child(doc, SDK_CLASSES["ClusterServingRuntime"], "runtime")
    assert any("protocolVersion: not a field" in e for e in errors), errors
    assert any("args: list[str]" in e for e in errors), errors
    assert any(e.startswith("runtime.spec.containers[0]:") and "name" in e for e in errors), errors


def test_the_inference_service_uses_the_runtime_as_it_declares_itself() -> None:
    docs = manifests()
    runtime, service = docs["ClusterServingRuntime"], docs["InferenceService"]
    spec, model = runtime["spec"], service["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert {"v1", "v2", "grpc-v2"} <= set(spec["protocolVersions"]) and model["protocolVersion"] in spec[
        "protocolVersions"]
    assert any(f["name"] == model["modelFormat"]["name"] == "tensorflow" and f["version"] == model["modelFormat"][
        "version"] for f in spec["supportedModelFormats"])
    (container,) = spec["containers"]
    assert container["name"] == "kserve-container"
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"


def test_the_runtime_s_command_serves_a_model_as_kserve_runs_it(test_models: Path, tmp_path: Path) -> None:
    """The container's arguments, with KServe's {{.Name}} and /mnt/models filled in (the ports
    are the test's own); the probes' paths answer, and both APIs serve the model."""
    import tritonclient.http as triton_http

    (container,) = manifests()["ClusterServingRuntime"]["spec"]["containers"]
    assert container["command"] == ["python", "-m", "broker"]
    args = [arg.replace("{{.Name}}", "half-plus-two").replace("/mnt/models", str(test_models / "linear"))
            .replace("/opt/tfbroker/", f"{ROOT}/") for arg in container["args"]
            if not arg.startswith(("--rest_api_port=", "--port="))]
    broker = BrokerProcess(tmp_path, args, frontends=1)
    try:
        broker.wait_available(["half-plus-two"])
        wait_for(lambda: broker.http.get(container["readinessProbe"]["httpGet"]["path"]).status_code == 200, 30,
                 "readiness")
        assert broker.http.get(container["livenessProbe"]["httpGet"]["path"]).json() == {"live": True}
        annotations = manifests()["ClusterServingRuntime"]["spec"]["annotations"]
        assert broker.http.get(annotations["prometheus.kserve.io/path"]).status_code == 200
        assert broker.predict("half-plus-two", {"instances": [2.0]}).json() == {"predictions": [4.0]}
        client = triton_http.InferenceServerClient(f"127.0.0.1:{broker.port}")
        given = triton_http.InferInput("x", [2], "FP32")
        given.set_data_from_numpy(np.array([2.0, 4.0], np.float32))
        assert client.infer("half-plus-two", [given]).as_numpy("y").tolist() == [4.0, 5.0]
        client.close()
        # Without --enable_model_control a client may list the repository, not change it.
        index = broker.http.post("/v2/repository/index", json={"ready": True}).json()
        assert index == [{"name": "half-plus-two", "version": "2", "state": "READY", "reason": ""}]
        refused = broker.http.post("/v2/repository/models/half-plus-two/unload")
        assert refused.status_code == 400 and "--enable_model_control" in refused.json()["error"]
    finally:
        stop_and_check(broker)
