"""``python -m broker.tune`` on a user's model: a small sweep, end to end, with real brokers.
(Its speed and how well its figure holds on a second run are bench/tune.py's.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from broker.config_files import parse_batching_parameters
from tests.conftest import ROOT


def tune(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "broker.tune", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_a_small_sweep_recommends_a_setting_it_measured_and_writes_its_batching_file(user_models: Path,
                                                                                      tmp_path: Path) -> None:
    # mixed/1: int32 and float64 inputs, a string output: synthetic requests from its signature.
    out = tmp_path / "batching.pbtxt"
    result = tune(f"--model_base_path={user_models / 'mixed'}", "--max_batch_sizes=4,32", "--batch_timeouts_micros=0",
                  "--tensorflow_threads=1:-1", "--batches_in_flight=2", "--frontends=1", "--concurrency=1,8", "--duration_s=0.5", "--p99_ms=1000",
                  "--json", f"--batching_parameters_out={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    settings = report["settings"]
    assert [(s["max_batch_size"], s["batch_timeout_micros"], s["intra_op_threads"], s["inter_op_threads"],
             s["batches_in_flight"], s["frontends"]) for s in settings] == [(4, 0, 1, -1, 2, 1), (32, 0, 1, -1, 2, 1)]
    for setting in settings:
        assert [level["concurrency"] for level in setting["levels"]] == [1, 8]
        assert all(level["requests"] > 0 and level["errors"] == 0 and level["rps"] > 0 for level in setting["levels"])
    chosen = report["recommendation"]
    assert chosen["meets_target"] and chosen["p99_ms"] <= 1000
    # The recommendation is the measured point with the most requests a second.
    best = max((level["rps"], s["max_batch_size"]) for s in settings for level in s["levels"])
    assert (chosen["rps"], chosen["max_batch_size"]) == best
    assert report["verified"]["requests"] > 0 and report["verified"]["errors"] == 0
    params = parse_batching_parameters(out.read_text())
    assert (params.max_batch_size, params.batch_timeout_micros) == (chosen["max_batch_size"], 0)
    assert out.read_text() == chosen["batching_parameters"]
    assert chosen["flags"] == ("--enable_batching --batching_parameters_file=batching.pbtxt --batches_in_flight=2 "
                               "--frontends=1 --tensorflow_intra_op_parallelism=1 --tensorflow_inter_op_parallelism=-1")
    assert "Progress" not in result.stdout  # progress goes to stderr, stdout is the JSON alone


def test_a_base_path_without_versions_or_a_model_that_does_not_load_says_why(user_models: Path,
                                                                             tmp_path: Path) -> None:
    result = tune(f"--model_base_path={user_models / 'mixed' / '1'}")
    assert result.returncode == 2
    assert "has no numeric version directory (it holds a SavedModel: give its parent" in result.stderr
    broken = tmp_path / "broken" / "1"
    broken.mkdir(parents=True)
    (broken / "saved_model.pb").write_bytes(b"not a SavedModel")
    result = tune(f"--model_base_path={broken.parent}", "--duration_s=0.2", "--concurrency=1")
    assert result.returncode == 1
    assert "version 1 of the model did not load: Error parsing message with type 'tensorflow.SavedModel'" \
        in result.stderr, result.stderr[-2000:]
