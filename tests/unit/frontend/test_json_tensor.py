"""TF Serving's JSON formats, as api_rest.md describes them."""

from __future__ import annotations

import re

import numpy as np
import orjson
import pytest

from tfbroker.wire.errors import InvalidArgument
from frontend.json_tensor import format_predictions, parse_predict_body


def parse(body: object) -> tuple[dict[str, np.ndarray], str, bool]:
    return parse_predict_body(orjson.dumps(body))


def test_row_format_unnamed() -> None:
    inputs, signature, row = parse({"instances": [1.0, 2.0, 5.0]})
    assert signature == "serving_default" and row
    np.testing.assert_array_equal(inputs[""], [1.0, 2.0, 5.0])


def test_row_format_named_inputs_are_stacked() -> None:
    inputs, _, _ = parse({"instances": [{"a": [1, 2], "tag": "x"}, {"a": [3, 4], "tag": "y"}],
                          "signature_name": "s"})
    assert inputs["a"].tolist() == [[1, 2], [3, 4]] and inputs["a"].dtype == np.int64
    assert inputs["tag"].tolist() == [b"x", b"y"] and inputs["tag"].dtype == object


def test_columnar_format_and_b64() -> None:
    inputs, _, row = parse({"inputs": {"img": [{"b64": "AAE="}], "k": [[True, False]]}})
    assert not row
    assert inputs["img"].tolist() == [b"\x00\x01"]
    assert inputs["k"].dtype == np.bool_


def test_equal_length_strings_stay_bytes_objects() -> None:
    inputs, _, _ = parse({"instances": ["ab", "cd"]})
    assert inputs[""].dtype == object and inputs[""].tolist() == [b"ab", b"cd"]


@pytest.mark.parametrize(("body", "message"), [
    (b"{", "JSON Parse error"),
    (b"[]", "not a JSON object"),
    (b"{}", "Missing 'inputs' or 'instances'"),
    (b'{"instances": []}', "non-empty"),
    (b'{"instances": [[1], [1, 2]]}', "Failed to process element: 1 of 'instances' list. Error: INVALID_ARGUMENT: "
                                      "Expecting tensor size: 1 but got: 2"),
    (b'{"instances": [[[1, 2]], [[3], [4]]]}', "Failed to process element: 1 of 'instances' list. Error: "
                                               "INVALID_ARGUMENT: Expecting shape [1,2] but got: [2,1]"),
    (b'{"instances": [{"a": [1, 2]}, {"a": [[3]]}]}', "Failed to process element: 1 key: a of 'instances' list"),
    (b'{"inputs": [[1, 2], [3]]}', "Encountered list at unexpected size: 1 at level: 1 expected size: 2"),
    (b'{"inputs": {"a": [[1, 2], 3]}}', "JSON Value: 3 found at incorrect level: 2 in the JSON DOM. Expected at level: 2"),
    (b'{"instances": [{"a": 1}, {"b": 2}]}', "same inputs"),
    (b'{"instances": [{"a": 1}, 2]}', "mixes"),
    (b'{"instances": [{"b64": "!!"}]}', "base64"),
    (b'{"instances": [null]}', "JSON Value: null Type: Null is not of expected type"),
    (b'{"instances": [1], "signature_name": 3}', "signature_name"),
])
def test_bad_bodies(body: bytes, message: str) -> None:
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        parse_predict_body(body)


def test_predictions_in_row_and_columnar_format() -> None:
    y = np.array([[2.5], [3.0]], np.float32)
    assert orjson.loads(format_predictions({"y": y}, True)) == {"predictions": [[2.5], [3.0]]}
    two = {"a": np.array([1, 2]), "b_bytes": np.array([b"\xff", b"x"], dtype=object)}
    assert orjson.loads(format_predictions(two, True)) == {"predictions": [
        {"a": 1, "b_bytes": {"b64": "/w=="}}, {"a": 2, "b_bytes": {"b64": "eA=="}}]}
    assert orjson.loads(format_predictions(two, False)) == {"outputs": {
        "a": [1, 2], "b_bytes": [{"b64": "/w=="}, {"b64": "eA=="}]}}
    text = {"label": np.array([b"cat"], dtype=object)}
    assert orjson.loads(format_predictions(text, False)) == {"outputs": ["cat"]}


def test_row_format_needs_one_batch_size() -> None:
    with pytest.raises(InvalidArgument, match="different batch sizes"):
        format_predictions({"a": np.zeros(2), "b": np.zeros(3)}, True)


def test_float32_is_written_in_its_shortest_form_in_every_format() -> None:
    outputs = {"score": np.array([1.8], np.float32), "label": np.array([b"cat"], dtype=object)}
    assert format_predictions(outputs, row_format=True) == b'{"predictions":[{"score":1.8,"label":"cat"}]}'
    assert format_predictions(outputs, row_format=False) == b'{"outputs":{"score":[1.8],"label":["cat"]}}'
    assert format_predictions({"score": np.array([1.8], np.float32)}, row_format=True) == b'{"predictions":[1.8]}'
    assert format_predictions({"score": np.array(1.8, np.float32)}, row_format=True) == b'{"predictions":1.8}'
