"""ops/k8s/ (issue 13): valid against the current Kubernetes schema, and consistent with
tfbroker itself: the broker's command parses as its flags, the frontends reach the broker's
Service with the keys it expects, probes hit real endpoints, selectors select."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from broker.config import ServerConfig
from tfbroker.runtime.flags import add_dataclass_flags, dataclass_from_args
from tests.conftest import ROOT, BrokerProcess

K8S = ROOT / "ops" / "k8s"
VERSIONS = ("1.33.0", kubernetes_validate.latest_version())


def documents() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def find(kind: str, name: str) -> dict[str, Any]:
    matches = [d for d in documents() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, (kind, name)
    return matches[0]


def container(workload: dict[str, Any]) -> dict[str, Any]:
    return dict(workload["spec"]["template"]["spec"]["containers"][0])


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_is_valid_kubernetes(version: str) -> None:
    docs = documents()
    assert {d["kind"] for d in docs} >= {"DaemonSet", "Deployment", "Service", "HorizontalPodAutoscaler",
                                         "ConfigMap", "PersistentVolumeClaim", "NetworkPolicy"}
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)  # raises on any error


def test_the_broker_pod_runs_a_valid_broker_on_the_gpu() -> None:
    broker = container(find("DaemonSet", "tfbroker-broker"))
    assert broker["command"][:3] == ["python", "-m", "broker"]
    parser = argparse.ArgumentParser()
    add_dataclass_flags(parser, ServerConfig)
    config = dataclass_from_args(ServerConfig, parser.parse_args(broker["command"][3:]))
    assert config.frontends == 0 and config.curve_secret_key_file and config.curve_client_keys_dir
    assert broker["resources"]["limits"]["nvidia.com/gpu"] >= 1
    mounts = {m["name"]: m["mountPath"] for m in broker["volumeMounts"]}
    pod = find("DaemonSet", "tfbroker-broker")["spec"]["template"]["spec"]
    keys = {v["name"]: v for v in pod["volumes"]}["keys"]["secret"]["items"]
    key_files = {f"{mounts['keys']}/{item['path']}" for item in keys}
    assert config.curve_secret_key_file in key_files
    assert any(f.startswith(config.curve_client_keys_dir + "/") and f.endswith(".key") for f in key_files)
    assert config.model_config_file == mounts["config"]
    models = find("ConfigMap", "tfbroker-models")["data"]["models.config"]
    assert 'base_path: "/models/' in models and mounts["models"] == "/models"
    service = find("Service", "tfbroker-broker")
    assert service["spec"]["selector"].items() <= find("DaemonSet", "tfbroker-broker")["spec"]["template"][
        "metadata"]["labels"].items()
    assert config.frontend_address.endswith(f":{service['spec']['ports'][0]['port']}")
    # The control channel is never on the network: ipc:// in the pod.
    assert not config.control_address


def test_the_frontends_reach_the_broker_and_probe_the_model_status() -> None:
    deployment = find("Deployment", "tfbroker-frontends")
    frontends = container(deployment)
    assert frontends["command"] == ["gunicorn", "-c", "ops/gunicorn.conf.py", "frontend.app:app"]
    env = {e["name"]: e["value"] for e in frontends["env"]}
    broker_service = find("Service", "tfbroker-broker")
    assert env["TFBROKER_ADDRESS"] == f"tcp://{broker_service['metadata']['name']}:5555"
    mounts = {m["name"]: m["mountPath"] for m in frontends["volumeMounts"]}
    keys = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}["keys"]["secret"]["items"]
    key_files = {f"{mounts['keys']}/{item['path']}" for item in keys}
    assert {env["TFBROKER_CURVE_SECRET_KEY_FILE"], env["TFBROKER_CURVE_SERVER_KEY_FILE"]} <= key_files
    assert frontends["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert f"--metrics_path={annotations['prometheus.io/path']}" in env["TFBROKER_FRONTEND"].split()
    assert env["PROMETHEUS_MULTIPROC_DIR"] == mounts["metrics"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert find("Service", "tfbroker")["spec"]["selector"].items() <= labels.items()
    assert find("HorizontalPodAutoscaler", "tfbroker-frontends")["spec"]["scaleTargetRef"]["name"] == "tfbroker-frontends"
    policy = find("NetworkPolicy", "tfbroker-broker")["spec"]
    assert policy["ingress"][0]["from"][0]["podSelector"]["matchLabels"].items() <= labels.items()


def test_the_broker_probe_command_tells_a_running_broker_from_none(start_broker: Any, test_models: Path) -> None:
    probe = container(find("DaemonSet", "tfbroker-broker"))["livenessProbe"]["exec"]["command"]
    broker: BrokerProcess = start_broker(["--model_name=mlp", f"--model_base_path={test_models / 'mlp'}"],
                                         frontends=1)
    broker.wait_available(["mlp"])
    argv = [sys.executable if arg == "python" else arg.replace("/run/tfbroker", str(broker.runtime_dir))
            for arg in probe]
    assert subprocess.run(argv, cwd=ROOT, capture_output=True, timeout=30).returncode == 0
    broker.stop()
    assert subprocess.run(argv, cwd=ROOT, capture_output=True, timeout=30).returncode != 0
