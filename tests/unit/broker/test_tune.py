"""The tuner's requests and its choice (broker/tune), without processes."""

from __future__ import annotations

import json
import math

import pytest

from broker.tune import inputs, report
from broker.tune.load import LevelResult
from broker.tune.report import Measured
from broker.tune.settings import Setting


def signature(**specs: tuple[str, list[int]]) -> dict:
    return {"metadata": {"signature_def": {"signature_def": {"serving_default": {"inputs": {
        name: {"dtype": dtype, "tensor_shape": {"dim": [{"size": str(d)} for d in dims]}}
        for name, (dtype, dims) in specs.items()}}}}}}


def test_synthetic_requests_follow_the_signature_of_the_models_users_bring() -> None:
    metadata = signature(image=("DT_FLOAT", [-1, 32, 32, 3]), ids=("DT_INT64", [-1, 5]), steps=("DT_FLOAT", [-1, -1, 3]),
                         text=("DT_STRING", [-1]), flag=("DT_BOOL", [-1]), weight=("DT_DOUBLE", [-1]))
    bodies = inputs.synthetic_bodies(metadata, "serving_default", rows=2, count=3)
    assert len(bodies) == 3 and len(set(bodies)) == 3, "different values in each"
    columns = json.loads(bodies[0])["inputs"]
    assert (len(columns["image"]), len(columns["image"][0]), len(columns["image"][0][0]), len(columns["image"][0][0][0])) \
        == (2, 32, 32, 3)
    assert all(isinstance(v, int) and 0 <= v < 10 for row in columns["ids"] for v in row)
    assert len(columns["steps"][0]) == inputs.UNKNOWN_DIM  # an open inner dimension gets a length
    assert all(isinstance(v, str) for v in columns["text"]) and all(isinstance(v, bool) for v in columns["flag"])
    assert all(isinstance(v, float) for v in columns["weight"])
    with pytest.raises(ValueError, match="no signature 'other'"):
        inputs.synthetic_bodies(metadata, "other", rows=1)


def level(concurrency: int, rps: float, p99_ms: float, errors: int = 0) -> LevelResult:
    return LevelResult(concurrency, 100, errors, rps, p99_ms / 2, p99_ms)


def test_the_choice_is_the_most_requests_a_second_within_the_p99_target() -> None:
    small, large = Setting(8, 0, 2, 2), Setting(128, 5000, 2, 2)
    measured = [Measured(small, [level(1, 500, 2), level(64, 3000, 12)]),
                Measured(large, [level(1, 400, 6), level(64, 4500, 30), level(128, 5000, 9, errors=3)])]
    chosen = report.best(measured, p99_ms=20)
    assert chosen is not None and (chosen.setting, chosen.level.rps, chosen.meets_target) == (small, 3000, True)
    unconstrained = report.best(measured, p99_ms=None)
    assert unconstrained is not None and (unconstrained.setting, unconstrained.level.rps) == (large, 4500)
    too_strict = report.best(measured, p99_ms=1)
    assert too_strict is not None and (too_strict.level.p99_ms, too_strict.meets_target) == (2, False)
    assert report.best([Measured(small, [level(1, 0, math.nan, errors=5)])], p99_ms=None) is None


def test_the_batching_file_is_tf_servings_text_format() -> None:
    from broker.config_files import parse_batching_parameters

    params = parse_batching_parameters(Setting(32, 2500, 4, 1).batching_parameters())
    assert (params.max_batch_size, params.batch_timeout_micros, params.max_enqueued_batches) == (32, 2500, 100)
