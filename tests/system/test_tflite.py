"""TensorFlow Lite models, as TF Serving serves them with --prefer_tflite_model (or its older
--use_tflite_model): a version directory's model.tflite through TensorFlow Lite's interpreter,
its signatures as the model's, batched, checked and answered like a SavedModel's."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from tfbroker import Client
from tests.conftest import BrokerProcess, make_model_config, serving, stop_and_check, wait_for
from tests.system.test_user_models import grpc_predict


def test_the_flag_serves_model_tflite_on_every_path(user_models: Path, tmp_path: Path) -> None:
    with serving(tmp_path, {"lite": user_models / "lite"}, args=["--prefer_tflite_model"]) as broker:
        # y = 3·sum(x) + 1: the TensorFlow Lite model, not the SavedModel beside it (2·sum(x) + 1).
        answer = broker.predict("lite", {"instances": [{"x": [1.0, 2.0], "k": 1}, {"x": [0.5, 0.5], "k": 4}]})
        assert answer.json() == {"predictions": [{"k2": 2, "y": 10.0}, {"k2": 8, "y": 4.0}]}, answer.text
        metadata = broker.http.get("/v1/models/lite/metadata").json()["metadata"]["signature_def"]["signature_def"]
        inputs = metadata["serving_default"]["inputs"]
        assert {n: (t["dtype"], [d["size"] for d in t["tensor_shape"]["dim"]]) for n, t in inputs.items()} == {
            "x": ("DT_FLOAT", ["-1", "2"]), "k": ("DT_INT32", ["-1"])}
        status, _, outputs = grpc_predict(broker.grpc_port, "lite", {"x": np.ones([3, 2], np.float32),
                                                                      "k": np.arange(3, dtype=np.int32)})
        assert status == 200 and outputs["y"].tolist() == [7.0] * 3 and outputs["k2"].tolist() == [0, 2, 4]

        # Batched with each other, each request gets its own rows (the interpreter resized to each batch).
        def call(i: int) -> tuple[int, list[float]]:
            with Client(broker.address) as client:
                result = client.predict("lite", {"x": np.full([i % 3 + 1, 2], i, np.float32),
                                                 "k": np.full([i % 3 + 1], i, np.int32)})
            return i, result.outputs["y"].tolist()

        with ThreadPoolExecutor(8) as pool:
            for i, y in pool.map(call, range(40)):
                assert y == [6.0 * i + 1.0] * (i % 3 + 1)

        # A wrong inner dimension, which the interpreter would not catch, is refused at admission.
        refused = broker.predict("lite", {"inputs": {"x": [[1.0, 2.0, 3.0]], "k": [1]}})
        assert refused.status_code == 400
        assert refused.json()["error"] == "input 'x': expected shape [-1,2] (float32), got [1,3]"


def test_without_the_flag_the_saved_model_serves_and_a_lone_tflite_fails_naming_the_flag(user_models: Path,
                                                                                          tmp_path: Path) -> None:
    config = make_model_config({"lite": user_models / "lite", "lone": user_models / "lite_only"})
    (tmp_path / "models.config").write_text(config)
    broker = BrokerProcess(tmp_path, [f"--model_config_file={tmp_path / 'models.config'}"], frontends=1)
    try:
        broker.wait_available(["lite"])
        answer = broker.predict("lite", {"instances": [{"x": [1.0, 2.0], "k": 1}]})
        assert answer.json() == {"predictions": [{"k2": 2, "y": 7.0}]}, answer.text  # 2·3 + 1: the SavedModel
        wait_for(lambda: "model lone version 1 failed to load" in broker.log(), 60, "the lone model.tflite to fail")
        assert ("holds a TensorFlow Lite model (model.tflite) and no SavedModel: serve it with --prefer_tflite_model"
                in broker.log())
    finally:
        stop_and_check(broker)
