"""Concatenate, pad, run, split: with a numpy signature standing in for TensorFlow."""

from __future__ import annotations

import numpy as np
import pytest

from tfbroker.wire.errors import InvalidArgument
from workers.batch import JoinedInputs, TaskInput, run_batch, run_joined
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


def joined(*tasks: TaskInput) -> JoinedInputs:
    return JoinedInputs([t.request_id for t in tasks], [t.rows for t in tasks],
                       {"x": np.concatenate([t.inputs["x"] for t in tasks])})


def test_a_joined_batch_runs_once_and_answers_with_its_rows_unpadded() -> None:
    calls: list[int] = []
    tasks = [task(0, 1), task(1, 3, dtype="float32")]
    outputs = run_joined(make_signature(calls), joined(*tasks), padded_rows=8)
    assert calls == [8], "one model call, padded to 8 rows"
    assert isinstance(outputs, dict)
    np.testing.assert_allclose(outputs["y"], np.concatenate([t.inputs["x"].sum(axis=1) for t in tasks]))
    assert outputs["rows"].tolist() == [8] * 4, "the padding rows are cut off"


def test_a_joined_batch_with_a_bad_task_runs_its_tasks_alone() -> None:
    calls: list[int] = []

    def refuse_negatives(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        calls.append(len(inputs["x"]))
        if (inputs["x"] < 0).any():
            raise InvalidArgument("x must not be negative")
        return {"y": inputs["x"] * 2}

    signature = Signature("s", {"x": TensorInfo("float32", (-1,))}, {"y": TensorInfo("float32", (-1,))},
                          refuse_negatives)
    batch = JoinedInputs([7, 8, 9], [2, 1, 2], {"x": np.array([1, 2, -3, 4, 5], np.float32)})
    outcomes = run_joined(signature, batch, padded_rows=8)
    assert calls == [8, 2, 1, 2]
    assert isinstance(outcomes, list)
    assert outcomes[0]["y"].tolist() == [2, 4] and outcomes[2]["y"].tolist() == [8, 10]  # type: ignore[index]
    assert isinstance(outcomes[1], InvalidArgument)


def test_a_joined_batch_with_string_outputs_is_cut_per_task() -> None:
    def as_text(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"s": np.array([str(v).encode() for v in inputs["x"]], dtype=object)}

    signature = Signature("s", {"x": TensorInfo("int64", (-1,))}, {"s": TensorInfo("string", (-1,))}, as_text)
    outcomes = run_joined(signature, JoinedInputs([1, 2], [1, 2], {"x": np.array([5, 6, 7])}), padded_rows=4)
    assert isinstance(outcomes, list)
    assert [o["s"].tolist() for o in outcomes] == [[b"5"], [b"6", b"7"]]  # type: ignore[index]


def test_a_joined_batch_whose_output_has_no_batch_dimension_runs_its_tasks_alone() -> None:
    def total(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"sum": np.asarray(inputs["x"].sum())}

    signature = Signature("s", {"x": TensorInfo("float32", (-1,))}, {"sum": TensorInfo("float32", ())}, total)
    outcomes = run_joined(signature, JoinedInputs([1, 2], [1, 2], {"x": np.array([1, 2, 3], np.float32)}), 0)
    assert isinstance(outcomes, list)
    assert [float(o["sum"]) for o in outcomes] == [1.0, 5.0]  # type: ignore[index]


def test_a_joined_batch_with_wrong_input_names_fails_every_task() -> None:
    outcomes = run_joined(make_signature([]), JoinedInputs([1, 2], [1, 1], {"z": np.ones((2, 2))}), 2)
    assert isinstance(outcomes, list) and all(isinstance(o, InvalidArgument) for o in outcomes)


def test_tasks_out_of_time_are_answered_unrun() -> None:
    from tfbroker.wire import protocol
    from tfbroker.wire.errors import DeadlineExceeded
    from workers.batch import decode_batch, split_expired

    header = protocol.encode_header(protocol.Request(id=4, model="m", timeout_ms=5,
                                                     inputs=[protocol.TensorSpec("x", "float32", (1,))]))
    frames = [header, np.ones(1, np.float32).tobytes(), header, np.ones(1, np.float32).tobytes()]
    late, on_time = decode_batch(frames, [2, 2], [1.0, 3.0], now=2.0)
    assert isinstance(late.error, DeadlineExceeded) and late.request_id == 4
    assert on_time.error is None and on_time.rows == 1

    inputs = {"x": np.arange(6, dtype=np.float32)}
    batch, expired = split_expired([1, 2, 3], [1, 2, 3], inputs, [5.0, 1.0, 5.0], now=2.0)
    assert expired == {1}
    assert batch.ids == [1, 3] and batch.rows == [1, 3]
    assert batch.inputs["x"].tolist() == [0.0, 3.0, 4.0, 5.0]


def test_a_task_without_a_batch_dimension_runs_alone_unpadded() -> None:
    calls: list[tuple[int, ...]] = []

    def plus_one(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        calls.append(inputs["x"].shape)
        return {"y": inputs["x"] + 1}

    signature = Signature("serving_default", {"x": TensorInfo("float32", None)}, {"y": TensorInfo("float32", None)},
                          plus_one)
    scalar = TaskInput(1, {"x": np.array(2.0, np.float32)}, 0)
    rows = TaskInput(2, {"x": np.array([1.0], np.float32)}, 1)
    outcomes = run_batch(signature, [scalar, rows], padded_rows=4)
    assert np.asarray(outcomes[0]["y"]).tolist() == 3.0  # type: ignore[index]
    assert np.asarray(outcomes[1]["y"]).tolist() == [2.0]  # type: ignore[index]
    assert calls == [(), (1,)], "each alone, neither padded"


def test_a_value_that_does_not_fit_fails_its_task_alone_in_a_joined_batch() -> None:
    calls: list[int] = []
    signature = Signature("serving_default", {"x": TensorInfo("float32", (-1,))}, {"y": TensorInfo("float32", (-1,))},
                          lambda inputs: calls.append(len(inputs["x"])) or {"y": inputs["x"] * 2})
    batch = JoinedInputs([1, 2], [1, 1], {"x": np.array([1, 1 << 40])})
    signature.inputs["x"] = TensorInfo("int32", (-1,))
    good, bad = run_joined(signature, batch, 0)  # type: ignore[misc]
    assert np.asarray(good["y"]).tolist() == [2]  # type: ignore[index]
    assert isinstance(bad, InvalidArgument) and "is not of expected type: int32" in bad.message


def test_tensorflows_graph_internals_are_cut_from_a_model_error() -> None:
    from workers.model import model_error

    assert model_error("indices[0,4] = 500 is not in [0, 100)\n\t [[{{function_node __inference_serve_26}}"
                       "{{node embedding/GatherV2}}]]") == "indices[0,4] = 500 is not in [0, 100)"
    assert model_error("Incompatible shapes: [10] vs. [1,9]\n\t [[{{node mul}}]]") == "Incompatible shapes: [10] vs. [1,9]"
