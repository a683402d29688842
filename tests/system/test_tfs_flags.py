"""TF Serving's flags that change how versions load and batch: each with TF Serving's meaning."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
from pathlib import Path

import httpx

from tests.conftest import ROOT, BrokerProcess, make_model_config, serving


def test_version_flag_prints_and_exits() -> None:
    result = subprocess.run([sys.executable, "-m", "broker", "--version"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.startswith("tfbroker "), result


def test_saved_model_tags_choose_the_metagraph(test_models: Path, tmp_path: Path) -> None:
    with serving(tmp_path, {"tagged": test_models / "tagged"}, ["--saved_model_tags=serve,gpu"]) as broker:
        assert broker.predict("tagged", {"instances": [2.0]}).json() == {"predictions": [3.0]}


def test_per_version_batching_warmup_off_and_load_retries(test_models: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(test_models / "batch_reporter", models / "batch_reporter")
    shutil.copytree(test_models / "linear" / "1", models / "bad_batching" / "1")
    # batch_reporter/1 batches at most 4 rows, padded to 4; bad_batching/1's file does not parse.
    (models / "batch_reporter" / "1" / "batching_params.pbtxt").write_text(
        "max_batch_size { value: 4 }\nbatch_timeout_micros { value: 50000 }\nallowed_batch_sizes: 4\n")
    (models / "bad_batching" / "1" / "batching_params.pbtxt").write_text("max_batch_size { value: oops }\n")
    served = {"batch_reporter": models / "batch_reporter", "bad_batching": models / "bad_batching",
              "warm_bad": test_models / "warm_bad", "broken": test_models / "broken"}
    (tmp_path / "models.config").write_text(make_model_config(served))
    broker = BrokerProcess(tmp_path / "run", [
        f"--model_config_file={tmp_path / 'models.config'}", "--enable_per_model_batching_parameters=true",
        "--enable_model_warmup=false", "--max_num_load_retries=2", "--load_retry_interval_micros=200000"],
        frontends=1)
    try:
        broker.wait_available(["batch_reporter", "warm_bad"])
        rows: list[float] = []

        def call() -> None:
            with httpx.Client(base_url=broker.base_url, timeout=30) as client:
                answer = client.post("/v1/models/batch_reporter:predict", json={"instances": [0.0]})
                rows.extend(answer.json()["predictions"])

        threads = [threading.Thread(target=call) for _ in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert len(rows) == 12 and set(rows) == {4.0}, rows  # every batch ran padded to 4 rows

        # bad_batching/1 failed to load (its batching file); warm_bad loaded without its warm-up.
        [status] = broker.http.get("/v1/models/bad_batching").json()["model_version_status"]
        assert status["state"] == "END" and "batching_params.pbtxt cannot be used" in status["status"]["error_message"]
        assert broker.predict("warm_bad", {"instances": [1.0]}).status_code == 200

        # broken/1 was tried three times (two retries) before it ended.
        assert "retry 2 of 2" in broker.log() and "retry 3" not in broker.log()
        [state] = broker.http.get("/v1/models/broken").json()["model_version_status"]
        assert state["state"] == "END" and state["status"]["error_code"] != "OK", state
    finally:
        broker.stop()
