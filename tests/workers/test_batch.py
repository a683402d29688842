"""Concatenate, pad, run, split: with a numpy signature standing in for TensorFlow."""

from __future__ import annotations

import numpy as np
import pytest

from broker.errors import InvalidArgument
from workers.batch import TaskInput, run_batch
from workers.model import Signature, TensorInfo


def make_signature(calls: list[int]) -> Signature:
    def run(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = inputs["x"]
        calls.append(x.shape[0])
        if x.ndim != 2 or x.shape[1] != 2:
            raise InvalidArgument(f"x must be [batch, 2], got {list(x.shape)}")
        return {"y": x.sum(axis=1), "rows": np.full(x.shape[0], x.shape[0])}

    return Signature("serving_default", {"x": TensorInfo("float32", (-1, 2))},
                     {"y": TensorInfo("float32", (-1,))}, run)


def task(request_id: int, rows: int, width: int = 2, dtype: str = "float64") -> TaskInput:
    x = np.arange(rows * width, dtype=dtype).reshape(rows, width) + 10 * request_id
    return TaskInput(request_id, {"x": x}, rows)


def test_one_call_per_batch_and_each_task_gets_its_rows() -> None:
    calls: list[int] = []
    tasks = [task(0, 1), task(1, 3), task(2, 2)]
    outcomes = run_batch(make_signature(calls), tasks, padded_rows=8)
    assert calls == [8], "one model call, padded to 8 rows"
    for t, out in zip(tasks, outcomes):
        assert isinstance(out, dict)
        np.testing.assert_allclose(out["y"], t.inputs["x"].sum(axis=1))
        assert out["rows"].tolist() == [8] * t.rows


def test_inputs_are_cast_to_the_signature_dtype() -> None:
    calls: list[int] = []
    [out] = run_batch(make_signature(calls), [task(0, 2, dtype="int64")], padded_rows=2)
    assert isinstance(out, dict) and out["y"].tolist() == [1.0, 5.0]


def test_a_bad_task_fails_alone() -> None:
    calls: list[int] = []
    tasks = [task(0, 1), task(1, 1, width=3), task(2, 2)]
    outcomes = run_batch(make_signature(calls), tasks, padded_rows=4)
    assert isinstance(outcomes[1], InvalidArgument)
    assert isinstance(outcomes[0], dict) and isinstance(outcomes[2], dict)
    np.testing.assert_allclose(outcomes[2]["y"], [41.0, 45.0])


def test_unnamed_input_is_the_only_input_and_wrong_names_are_refused() -> None:
    calls: list[int] = []
    unnamed = TaskInput(0, {"": np.ones((1, 2))}, 1)
    wrong = TaskInput(1, {"z": np.ones((1, 2))}, 1)
    outcomes = run_batch(make_signature(calls), [unnamed, wrong], padded_rows=2)
    assert isinstance(outcomes[0], dict) and outcomes[0]["y"].tolist() == [2.0]
    assert isinstance(outcomes[1], InvalidArgument)
    assert "got ['z']" in str(outcomes[1])


def test_model_failure_answers_every_task() -> None:
    def boom(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise RuntimeError("device lost")

    signature = Signature("s", {"x": TensorInfo("float32", None)}, {}, boom)
    outcomes = run_batch(signature, [task(0, 1), task(1, 1)], padded_rows=2)
    assert [type(o).__name__ for o in outcomes] == ["Internal", "Internal"]
    assert "device lost" in str(outcomes[0])


@pytest.mark.parametrize("padded", [0, 3])
def test_no_padding_when_not_asked(padded: int) -> None:
    calls: list[int] = []
    run_batch(make_signature(calls), [task(0, 3)], padded_rows=padded)
    assert calls == [3]
