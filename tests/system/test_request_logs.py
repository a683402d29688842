"""TF Serving's request logs: a model's logging_config writes sampled requests and answers as
PredictionLog records in TFRecord files, read back here as TensorFlow reads them."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from tests.conftest import ROOT, BrokerProcess, stop_and_check, wait_for
from tests.system.test_grpc import examples, tfs
from tests.system.test_metrics import PATH, samples, value

READ_LOGS = """
import glob, json, sys
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import prediction_log_pb2

records = []
for path in sorted(glob.glob(sys.argv[1] + "*.tfrecord")):
    for raw in tf.data.TFRecordDataset(path):
        entry = prediction_log_pb2.PredictionLog.FromString(raw.numpy())
        kind = entry.WhichOneof("log_type")
        log = getattr(entry, kind)
        record = {
            "kind": kind, "model": entry.log_metadata.model_spec.name,
            "version": entry.log_metadata.model_spec.version.value,
            "signature": entry.log_metadata.model_spec.signature_name,
            "rate": entry.log_metadata.sampling_config.sampling_rate,
            "tags": list(entry.log_metadata.saved_model_tags), "time": entry.log_metadata.timestamp_secs,
            "specs": [log.request.model_spec.signature_name, log.response.model_spec.version.value]}
        if kind == "predict_log":
            record["inputs"] = {k: tf.make_ndarray(v).tolist() for k, v in log.request.inputs.items()}
            record["outputs"] = {k: tf.make_ndarray(v).tolist() for k, v in log.response.outputs.items()}
        else:
            record["examples"] = [list(e.features.feature["x"].float_list.value)
                                  for e in log.request.input.example_list.examples]
            result = log.response.result
            record["results"] = ([[[c.label, c.score] for c in row.classes] for row in result.classifications]
                                 if kind == "classify_log" else [r.value for r in result.regressions])
        records.append(record)
print(json.dumps(records))
"""


def read_logs(prefix: Path) -> list[dict[str, Any]]:
    """Every record under ``prefix``, read with tf.data.TFRecordDataset (in a child: TensorFlow stays out of pytest)."""
    result = subprocess.run([sys.executable, "-c", READ_LOGS, str(prefix)], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return list(json.loads(result.stdout.strip().splitlines()[-1]))


@dataclass(frozen=True)
class Logging:
    broker: BrokerProcess
    logs: Path  # linear's prefix is logs/linear, sampled's logs/sampled
    cramped: Path | None  # cramped's prefix, on a 64 KiB tmpfs; None where none can be mounted


@pytest.fixture(scope="module")
def logging_broker(test_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Logging]:
    """One broker, four models with a logging_config each: ``linear`` logs every request,
    ``sampled`` a tenth, ``examples`` (half_plus_two) every classify and regress, ``cramped``
    every request to a disk that fills (when one can be mounted)."""
    tmp = tmp_path_factory.mktemp("request_logs")
    disk = tmp / "small"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True)
    linear, logs = test_models / "linear", tmp / "logs"
    models = {"linear": (linear, 1.0, logs / "linear"), "sampled": (linear, 0.1, logs / "sampled"),
              "examples": (test_models / "half_plus_two", 1.0, logs / "examples")}
    if mounted.returncode == 0:
        models["cramped"] = (linear, 1.0, disk / "cramped")
    entries = "".join(f"""config {{ name: "{name}" base_path: "{path}" model_platform: "tensorflow"
        logging_config {{ sampling_config {{ sampling_rate: {rate} }}
                          log_collector_config {{ type: "tfrecord" filename_prefix: "{prefix}" }} }} }}
    """ for name, (path, rate, prefix) in models.items())
    (tmp / "models.config").write_text(f"model_config_list {{ {entries} }}")
    (tmp / "monitoring.config").write_text("prometheus_config { enable: true }\n")
    broker = BrokerProcess(tmp / "run", [f"--model_config_file={tmp / 'models.config'}",
                                         f"--monitoring_config_file={tmp / 'monitoring.config'}"], frontends=2)
    try:
        broker.wait_available(list(models))
        yield Logging(broker, tmp / "logs", disk / "cramped" if "cramped" in models else None)
    finally:
        stop_and_check(broker)
        if mounted.returncode == 0:
            subprocess.run(["umount", str(disk)], capture_output=True)
        else:
            print(f"no small tmpfs here (needs root): {mounted.stderr.decode().strip()}")


def logged(broker: BrokerProcess, model: str, status: str = "OK") -> float:
    return value(samples(broker.http.get(PATH).text), ":tensorflow:serving:request_log_count",
                 model_name=model, status_code=status)


def post(broker: BrokerProcess, model: str, body: dict[str, Any]) -> httpx.Response:
    # A new connection each: the kernel spreads them over both frontends.
    return httpx.post(f"{broker.base_url}/v1/models/{model}:predict", json=body, timeout=30,
                      headers={"connection": "close"})


def test_every_request_is_logged_as_tf_serving_writes_it(logging_broker: Logging) -> None:
    broker, prefix = logging_broker.broker, logging_broker.logs / "linear"
    sent = [[float(i), i + 0.125] for i in range(20)]
    answers = []
    for pair in sent:
        # The row form names no input ("instances": [...]): the log names it, as TF Serving.
        response = post(broker, "linear", {"instances": pair})
        assert response.status_code == 200, response.text
        answers.append(response.json()["predictions"])
    assert post(broker, "linear", {"instances": ["not a number"]}).status_code == 400  # a failed request is not logged
    wait_for(lambda: logged(broker, "linear") == len(sent), 30, "every request's record")
    records = read_logs(prefix)
    assert len(records) == len(sent)
    assert len({path.name.rsplit("-", 2)[1] for path in prefix.parent.glob("linear-*.tfrecord")}) == 2, \
        "each frontend writes a file of its own"
    assert {r["kind"] for r in records} == {"predict_log"}
    got = sorted((r["inputs"]["x"], r["outputs"]["y"]) for r in records)
    assert got == sorted(zip(sent, answers))
    first = records[0]
    assert (first["model"], first["version"], first["signature"], first["rate"], first["tags"]) == \
        ("linear", 2, "serving_default", 1.0, ["serve"])
    assert logged(broker, "linear", "RESOURCE_EXHAUSTED") == 0


def test_classify_and_regress_are_logged_with_their_examples_and_results(logging_broker: Logging) -> None:
    broker = logging_broker.broker
    classify = broker.http.post("/v1/models/examples:classify", json={
        "signature_name": "classify_x_to_y", "examples": [{"x": 1.0}, {"x": 2.0}, {"x": 3.0}]})
    assert classify.status_code == 200, classify.text
    # By gRPC, with a context merged into each example; and both tasks of a MultiInference.
    spec = {"name": "examples", "signature_name": "regress_x_to_y"}
    with_context = {"example_list_with_context": {
        "context": {"features": {"feature": {"x": {"float_list": {"value": [4.0]}}}}},
        "examples": [{}, {"features": {"feature": {"x": {"float_list": {"value": [2.0]}}}}}]}}
    regress, multi = tfs(broker, {"rpc": "Regress", "request": {"model_spec": spec, "input": with_context}},
                         {"rpc": "MultiInference", "request": {"input": examples(6.0), "tasks": [
                             {"model_spec": {**spec, "signature_name": "classify_x_to_y"},
                              "method_name": "tensorflow/serving/classify"},
                             {"model_spec": spec, "method_name": "tensorflow/serving/regress"}]}})
    assert regress["code"] == multi["code"] == "OK", (regress, multi)
    wait_for(lambda: logged(broker, "examples") == 4, 30, "the four records")
    records = sorted(read_logs(logging_broker.logs / "examples"), key=lambda r: (r["kind"], len(r["examples"])))
    assert [(r["kind"], r["signature"], r["specs"], r["examples"], r["results"]) for r in records] == [
        ("classify_log", "classify_x_to_y", ["classify_x_to_y", 123], [[6.0]], [[["", 5.0]]]),
        ("classify_log", "classify_x_to_y", ["classify_x_to_y", 123], [[1.0], [2.0], [3.0]],
         [[["", 2.5]], [["", 3.0]], [["", 3.5]]]),
        ("regress_log", "regress_x_to_y", ["regress_x_to_y", 123], [[6.0]], [5.0]),
        ("regress_log", "regress_x_to_y", ["regress_x_to_y", 123], [[4.0], [2.0]], [4.0, 3.0])]
    assert {(r["model"], r["version"], r["rate"]) for r in records} == {("examples", 123, 1.0)}


def test_a_sampling_rate_of_a_tenth_logs_about_a_tenth(logging_broker: Logging) -> None:
    broker, prefix = logging_broker.broker, logging_broker.logs / "sampled"
    with httpx.Client(base_url=broker.base_url, timeout=30) as http:
        for i in range(600):
            assert http.post("/v1/models/sampled:predict", json={"instances": [float(i)]}).status_code == 200
    # Binomial(600, 0.1): mean 60, standard deviation 7.3; this is 5 deviations each way.
    wait_for(lambda: 23 <= logged(broker, "sampled") <= 97 and len(read_logs(prefix)) == logged(broker, "sampled"),
             60, "about a tenth of the requests logged, every one counted")


def test_a_full_disk_drops_records_and_counts_them_and_serving_goes_on(logging_broker: Logging) -> None:
    if logging_broker.cramped is None:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    broker = logging_broker.broker
    rows = [float(i) for i in range(1000)]  # about 8 KiB of record: the disk holds a few
    with httpx.Client(base_url=broker.base_url, timeout=30) as http:
        for _ in range(40):
            assert http.post("/v1/models/cramped:predict", json={"instances": rows}).status_code == 200
    wait_for(lambda: logged(broker, "cramped") + logged(broker, "cramped", "RESOURCE_EXHAUSTED") == 40, 30,
             "every record counted")
    written, dropped = logged(broker, "cramped"), logged(broker, "cramped", "RESOURCE_EXHAUSTED")
    assert written >= 1 and dropped >= 1, (written, dropped)
    # What was written is whole: TensorFlow reads every record the counter says it kept.
    assert len(read_logs(logging_broker.cramped)) == written
    assert post(broker, "cramped", {"instances": [1.0]}).json() == {"predictions": [3.5]}
