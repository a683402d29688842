"""TF Serving's JSON tensors, exactly, against a running server: what each dtype takes and
refuses, NaN and infinities both ways, int64 exactly, and a property test of the codec."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import BrokerProcess, serving

BASE = {"f32": [1.5], "f64": [1.5], "i32": [1], "i64": [1], "flag": [True], "s": ["a"]}


@pytest.fixture(scope="module")
def typed(test_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    with serving(tmp_path_factory.mktemp("typed"), {"typed": test_models / "typed"}) as broker:
        yield broker


def call(broker: BrokerProcess, **inputs: Any) -> Any:
    body = json.dumps({"inputs": {**BASE, **inputs}}, allow_nan=True)
    return broker.http.post("/v1/models/typed:predict", content=body, headers={"content-type": "application/json"})


@pytest.mark.parametrize(("field", "value", "message"), [
    ("i32", [2 ** 31], "JSON Value: 2147483648 Type: Number is not of expected type: int32"),
    ("i32", [1.5], "values of type double are not of expected type: int32"),
    ("i64", [1.0], "values of type double are not of expected type: int64"),
    ("flag", [1], "values of type int64 are not of expected type: bool"),
    ("f32", [True], "values of type bool are not of expected type: float"),
    ("f32", [True, 1.0], "JSON Value: true Type: True is not of expected type: float"),
    ("f32", [None], "JSON Value: null Type: Null is not of expected type: float"),
    ("f64", [1.0, None], "JSON Value: null Type: Null is not of expected type: double"),
    ("i64", [None, 2], "JSON Value: null Type: Null is not of expected type: int64"),
    ("s", [5], "values of type int64 are not of expected type: string"),
    ("f32", [1.0, "a"], 'JSON Value: "a" Type: String is not of expected type: float'),
    ("s", ["a", 1], "JSON Value: 1 Type: Number is not of expected type: string"),
    ("i64", [["a"]], None),
])
def test_values_that_do_not_fit_the_signature_are_refused(typed: BrokerProcess, field: str, value: Any,
                                                         message: str | None) -> None:
    response = call(typed, **{field: value})
    assert response.status_code == 400, response.text
    if message:
        assert message in response.json()["error"]


def test_any_json_number_feeds_a_float_input_converted_as_cpp_converts_it(typed: BrokerProcess) -> None:
    """TF Serving since 2021 (api_rest.md, "Floating Point Precision"): no loss-of-precision error."""
    body = ('{"inputs": {"f32": [1435774380, 1.8e308, -1.8e308, 2.2e-308, 16777217, 1e300], '
            '"f64": [1.8e308, -1.8e308, 1, 2, 3, 4], "i32": [1, 2, 3, 4, 5, 6], "i64": [1, 2, 3, 4, 5, 6], '
            '"flag": [true, true, true, true, true, true], "s": ["a", "b", "c", "d", "e", "f"]}}')
    response = typed.http.post("/v1/models/typed:predict", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text
    outputs = json.loads(response.text)["outputs"]
    assert np.array(outputs["f32_out"], np.float32).tolist() == [1435774336.0, float("inf"), -float("inf"), 0.0,
                                                                 16777216.0, float("inf")]
    assert '"f64_out":[Infinity,-Infinity,1.0,2.0,3.0,4.0]' in response.text


def test_a_number_too_big_for_a_double_is_tf_serving_s_parse_error(typed: BrokerProcess) -> None:
    """RapidJSON's words: an exponent over 308, or a significand of more than 308 digits."""
    for number in ("1e400", "-1e400", "1.5e310", "1" * 310):
        body = '{"inputs": {"f64": [1.0, %s]}}' % number
        response = typed.http.post("/v1/models/typed:predict", content=body)
        assert response.status_code == 400, (number, response.text)
        assert response.json()["error"] == ("JSON Parse error: Number too big to be stored in double. at offset: "
                                             f"{body.index(number)}")


def test_one_plain_value_for_several_inputs_gets_tf_serving_s_words(typed: BrokerProcess) -> None:
    rows = typed.http.post("/v1/models/typed:predict", json={"instances": [1.0, 2.0]})
    assert (rows.status_code, rows.json()["error"]) == (400, "instances is a plain list, but expecting list of objects "
                                                             "as multiple input tensors required as per tensorinfo_map")
    columns = typed.http.post("/v1/models/typed:predict", json={"inputs": [1.0, 2.0]})
    assert (columns.status_code, columns.json()["error"]) == (400, "inputs is a plain value/list, but expecting an "
                                                                   "object as multiple input tensors required as per "
                                                                   "tensorinfo_map")


def test_values_that_fit_are_taken_and_written_as_tf_serving_writes_them(typed: BrokerProcess) -> None:
    response = call(typed, f32=[16777215, 0.1, float("nan"), float("inf"), -float("inf"), 2.0],
                    f64=[0.1, 1e300, 3.0, float("nan"), 2.0, 1.0],
                    i32=[-(2 ** 31), 2 ** 31 - 1, 0, 1, 2, 3], i64=[2 ** 63 - 1, -(2 ** 63), 9007199254740993, 0, 1, 2],
                    flag=[True, False, True, False, True, False], s=["a", "b", "", "é", "x", {"b64": "AAE="}])
    assert response.status_code == 200, response.text
    text = response.text
    assert '"f32_out":[16777215.0,0.1,NaN,Infinity,-Infinity,2.0]' in text
    assert '"f64_out":[0.1,1e' in text and ',3.0,NaN,2.0,1.0]' in text  # (1e300 or 1e+300: the same number)
    assert '"i64_out":[9223372036854775807,-9223372036854775808,9007199254740993,0,1,2]' in text
    outputs = json.loads(text)["outputs"]
    assert outputs["i32_out"] == [-(2 ** 31), 2 ** 31 - 1, 0, 1, 2, 3]
    assert outputs["flag_out"] == [True, False, True, False, True, False]
    assert outputs["s_bytes"] == [{"b64": base64.b64encode(v).decode()} for v in [b"a", b"b", b"", "é".encode(), b"x",
                                                                                   b"\x00\x01"]]


columns = st.integers(1, 4).flatmap(lambda n: st.fixed_dictionaries({
    "f32": st.lists(st.floats(width=32, allow_nan=False), min_size=n, max_size=n),
    "f64": st.lists(st.floats(allow_nan=False), min_size=n, max_size=n),
    "i32": st.lists(st.integers(-(2 ** 31), 2 ** 31 - 1), min_size=n, max_size=n),
    "i64": st.lists(st.integers(-(2 ** 63), 2 ** 63 - 1), min_size=n, max_size=n),
    "flag": st.lists(st.booleans(), min_size=n, max_size=n),
    "s": st.lists(st.binary(max_size=8), min_size=n, max_size=n)}))


def test_every_dtype_round_trips_exactly(typed: BrokerProcess) -> None:
    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(columns)
    def check(values: dict[str, list[Any]]) -> None:
        body = {**values, "s": [{"b64": base64.b64encode(v).decode()} for v in values["s"]]}
        response = call(typed, **body)
        assert response.status_code == 200, response.text
        out = json.loads(response.text)["outputs"]
        assert out["i32_out"] == values["i32"] and out["i64_out"] == values["i64"]
        assert out["flag_out"] == values["flag"]
        assert out["f64_out"] == values["f64"]
        assert np.array(out["f32_out"], np.float32).tolist() == np.array(values["f32"], np.float32).tolist()
        assert [base64.b64decode(v["b64"]) for v in out["s_bytes"]] == values["s"]

    check()


def test_arbitrary_json_documents_get_200_or_a_json_4xx(typed: BrokerProcess) -> None:
    leaves = st.none() | st.booleans() | st.integers(-(2 ** 70), 2 ** 70) | st.floats() | st.text(max_size=4)
    documents = st.recursive(leaves, lambda c: st.lists(c, max_size=3) | st.dictionaries(
        st.sampled_from(["instances", "inputs", "signature_name", "f32", "i64", "s", "b64", "flag"]), c, max_size=4),
        max_leaves=16)

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(documents)
    def check(document: Any) -> None:
        response = typed.http.post("/v1/models/typed:predict", content=json.dumps(document, allow_nan=True),
                                   headers={"content-type": "application/json"})
        assert response.status_code == 200 or 400 <= response.status_code < 500, (document, response.text)
        assert response.headers["content-type"] == "application/json"
        response.json()

    check()
    assert call(typed).status_code == 200
