"""Input checking at admission (broker.models.check_inputs): from the header and frame sizes
alone, since the broker never decodes a tensor."""

from __future__ import annotations

import re

import pytest

from broker import lifecycle as lc
from broker.models import ServedVersion, check_inputs
from tfbroker.wire import protocol
from tfbroker.wire.errors import InvalidArgument

F32 = "float32"


def served_with(inputs: dict[str, tuple[str, list[int] | None]], method: str = "predict") -> ServedVersion:
    served = ServedVersion("m", 1, "/m/1", lc.Lifecycle("version 1"))
    served.model_signatures = served.signatures = {
        "serving_default": protocol.SignatureSpec(inputs=inputs, outputs={"y": (F32, [-1])})}
    served.signature_def = {"signature_def": {"serving_default": {"method_name": f"tensorflow/serving/{method}"}}}
    return served


def frame(spec: protocol.TensorSpec) -> bytes:
    size = 8 if spec.dtype in ("int64", "float64") else 4
    for dim in spec.shape:
        size *= dim
    return b"\0" * size


def check(served: ServedVersion, *specs: protocol.TensorSpec, method: str = "predict") -> tuple[int, object]:
    return check_inputs(served, "serving_default", list(specs), [frame(s) for s in specs], method)


def test_rows_and_join_key_from_the_batch_dimension() -> None:
    served = served_with({"a": (F32, [-1, 3]), "b": ("int32", [-1])})
    rows, key = check(served, protocol.TensorSpec("a", F32, (4, 3)), protocol.TensorSpec("b", "int32", (4,)))
    assert rows == 4
    assert key == (("a", F32, (3,)), ("b", "int32", ()))


def test_an_unnamed_input_is_the_signatures_only_input() -> None:
    rows, _ = check(served_with({"x": (F32, [-1])}), protocol.TensorSpec("", F32, (5,)))
    assert rows == 5


def test_requests_without_one_batch_dimension_run_alone_as_one_row() -> None:
    served = served_with({"a": (F32, []), "b": (F32, [-1]), "c": (F32, [2, 3]), "d": (F32, None)})
    scalar = protocol.TensorSpec("a", F32, ())
    fixed = protocol.TensorSpec("c", F32, (2, 3))
    assert check(served, scalar, protocol.TensorSpec("b", F32, (2,)), fixed,
                 protocol.TensorSpec("d", F32, (2,))) == (1, None)
    assert check(served, scalar, protocol.TensorSpec("b", F32, (0,)), fixed,
                 protocol.TensorSpec("d", F32, (0,))) == (1, None)
    # unknown rank: no rows to agree on, but a different first dimension cannot join
    assert check(served, scalar, protocol.TensorSpec("b", F32, (2,)), fixed,
                 protocol.TensorSpec("d", F32, (5, 1))) == (1, None)


def test_inputs_the_signature_batches_must_agree_on_their_rows() -> None:
    served = served_with({"a": (F32, [-1]), "b": (F32, [-1, 2])})
    with pytest.raises(InvalidArgument, match=re.escape(
            "Batching session Run() input tensors must have equal 0th-dimension size: input 'a' has 2, "
            "input 'b' has 3")):
        check(served, protocol.TensorSpec("a", F32, (2,)), protocol.TensorSpec("b", F32, (3, 2)))


@pytest.mark.parametrize(("declared", "given"), [
    ([-1, 32, 32, 3], (1, 1, 3)),  # wrong rank: aborts oneDNN's Conv2D if it gets through
    ([-1, 32, 32, 3], (1, 32, 32, 3, 1)),
    ([-1, 32, 32, 3], (2, 32, 31, 3)),  # a fixed dimension differs
    ([-1, 10], (10,)),  # a last dimension other than 1 may not be left out
    ([], (1,)),
    ([-1], ()),
])
def test_a_shape_that_does_not_fit_the_signature_is_refused_naming_both(declared: list[int],
                                                                       given: tuple[int, ...]) -> None:
    served = served_with({"image": (F32, declared)})
    expected = "[" + ",".join(map(str, declared)) + "]"
    with pytest.raises(InvalidArgument, match=re.escape(
            f"input 'image': expected shape {expected} (float32), got [{','.join(map(str, given))}]")):
        check(served, protocol.TensorSpec("image", F32, given))


@pytest.mark.parametrize(("declared", "given", "rows"), [
    ([-1, 32, 32, 3], (4, 32, 32, 3), 4),
    ([-1, -1], (2, 7), 2),
    ([-1, 1], (3,), 3),  # TF Serving's own example: [1.0, 2.0, 5.0] to half_plus_two's [-1, 1]
    (None, (2, 5, 5), 2),  # unknown rank: anything
])
def test_shapes_that_fit(declared: list[int] | None, given: tuple[int, ...], rows: int) -> None:
    rows_seen, _ = check(served_with({"x": (F32, declared)}), protocol.TensorSpec("x", F32, given))
    assert rows_seen == rows


def test_exact_dtypes_refuses_what_json_rules_would_cast() -> None:
    served = served_with({"x": (F32, [-1])})
    spec = protocol.TensorSpec("x", "float64", (2,))
    assert check_inputs(served, "serving_default", [spec], [frame(spec)]) == (2, (("x", "float64", ()),))
    with pytest.raises(InvalidArgument, match=re.escape("input 'x': values of type double are not of expected "
                                                        "type: float")):
        check_inputs(served, "serving_default", [spec], [frame(spec)], exact_dtypes=True)


@pytest.mark.parametrize(("specs", "message"), [
    ([protocol.TensorSpec("z", F32, (1,)), protocol.TensorSpec("b", "int64", (1,))],
     "input tensor alias not found in signature: z. Inputs expected to be in the set {a,b}."),
    ([protocol.TensorSpec("a", F32, (1,)), protocol.TensorSpec("a", F32, (1,)), protocol.TensorSpec("b", "int64", (1,))],
     "input 'a' is given twice"),
    ([protocol.TensorSpec("a", F32, (1,))],
     "input size does not match signature: 1!=2 len({a}) != len({a,b}). Sent extra: {}. Missing but required: {b}."),
    ([protocol.TensorSpec("a", F32, (1,)), protocol.TensorSpec("b", "int64", (1,)), protocol.TensorSpec("c", F32, (1,))],
     "input size does not match signature: 3!=2 len({a,b,c}) != len({a,b}). Sent extra: {c}. Missing but required: {}."),
    ([protocol.TensorSpec("a", "string", (1,)), protocol.TensorSpec("b", "int64", (1,))],
     "values of type string are not of expected type: float"),
    ([protocol.TensorSpec("a", F32, (1,)), protocol.TensorSpec("b", F32, (1,))],
     "values of type float are not of expected type: int64"),  # a float never feeds an integer input
])
def test_bad_inputs_are_refused_with_tf_servings_words(specs: list[protocol.TensorSpec], message: str) -> None:
    served = served_with({"a": (F32, [-1]), "b": ("int64", [-1])})
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        check_inputs(served, "serving_default", specs, [frame(s) if s.dtype != "string" else b"" for s in specs])


def test_frames_must_fill_their_declared_shape() -> None:
    served = served_with({"x": (F32, [-1, 2])})
    spec = protocol.TensorSpec("x", F32, (3, 2))
    with pytest.raises(InvalidArgument, match="20 bytes do not fill shape"):
        check_inputs(served, "serving_default", [spec], [b"\0" * 20])


def test_an_unknown_signature_is_refused() -> None:
    with pytest.raises(InvalidArgument, match='Serving signature name: "other" not found'):
        check_inputs(served_with({"x": (F32, [-1])}), "other", [], [])


def test_classify_needs_a_classify_signature_and_one_string_tensor_of_examples() -> None:
    predict = served_with({"x": (F32, [-1])})
    spec = protocol.TensorSpec("inputs", "string", (2,))
    with pytest.raises(InvalidArgument, match="Expected classification signature method_name to be "
                                              "tensorflow/serving/classify. Was: tensorflow/serving/predict"):
        check_inputs(predict, "serving_default", [spec], [b""], "classify")
    classify = served_with({"inputs": ("string", None)}, method="classify")
    classify.signatures["serving_default"].outputs["scores"] = (F32, [-1])
    assert check_inputs(classify, "serving_default", [spec], [b""], "classify") == (2, None)


def test_the_method_name_check_takes_tf_serving_s_three_methods_only() -> None:
    """--enable_signature_method_name_check (predict_util.cc's words, and its Internal status)."""
    from broker.models import check_method_name
    from tfbroker.wire.errors import Internal

    for method in ("predict", "classify", "regress"):
        check_method_name(served_with({"x": (F32, [-1])}, method), "serving_default")
    with pytest.raises(Internal, match=re.escape("Expected prediction signature method_name to be one of "
                                                 "{tensorflow/serving/predict, tensorflow/serving/classify, "
                                                 "tensorflow/serving/regress}. Was: tensorflow/serving/custom")):
        check_method_name(served_with({"x": (F32, [-1])}, "custom"), "serving_default")


def test_one_plain_value_for_several_inputs_gets_json_tensor_s_words() -> None:
    from tfbroker.wire.errors import PLAIN_INSTANCES

    with pytest.raises(InvalidArgument, match=re.escape(PLAIN_INSTANCES)):
        check(served_with({"a": (F32, [-1]), "b": (F32, [-1])}), protocol.TensorSpec("", F32, (2,)))
