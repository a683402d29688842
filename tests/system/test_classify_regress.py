""":classify and :regress on models shaped as TF Serving's own, with TF Serving's answers and errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.conftest import BrokerProcess, serving


@pytest.fixture(scope="module")
def tfs(test_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    # Shaped as TF Serving's own test models (tests/tfserving_models.py).
    models = {"half_plus_two": test_models / "half_plus_two", "half_plus_three": test_models / "half_plus_three",
              "tf2": test_models / "half_plus_two_tf2"}
    with serving(tmp_path_factory.mktemp("tfs"), models, labels={"half_plus_two": {"stable": 123}}) as broker:
        yield broker


def post(broker: BrokerProcess, path: str, body: Any) -> Any:
    return broker.http.post(f"/v1/models/{path}", json=body)


@pytest.mark.parametrize(("path", "body", "results"), [
    ("half_plus_two:classify", {"signature_name": "classify_x_to_y", "examples": [{"x": 1.0}, {"x": 2.0}]},
     [[["", 2.5]], [["", 3.0]]]),
    ("half_plus_two:regress", {"signature_name": "regress_x_to_y", "examples": [{"x": 1.0}, {"x": 2.0}]},
     [2.5, 3.0]),
    ("half_plus_two:regress", {"signature_name": "regress_x_to_y2", "examples": [{"x": 1.0}, {"x": 2.0}]},
     [3.5, 4.0]),
    ("half_plus_two/versions/123:regress", {"signature_name": "regress_x_to_y", "examples": [{"x": 5.0}]}, [4.5]),
    ("half_plus_two/labels/stable:classify", {"signature_name": "classify_x_to_y", "examples": [{"x": 5.0}]},
     [[["", 4.5]]]),
    # context features go into every example; an example's own value wins
    ("half_plus_two:regress", {"signature_name": "regress_x_to_y", "context": {"x": 4.0},
                               "examples": [{}, {"x": 2.0}]}, [4.0, 3.0]),
    # half_plus_three's TF 1.0 export: its default signature is the regression
    ("half_plus_three:regress", {"signature_name": "tensorflow/serving/regress",
                                 "examples": [{"x": 1.0}, {"x": 2.0}]}, [3.5, 4.0]),
    # a TF2 export marks its signatures "predict"; a string input and the right outputs serve
    ("tf2:regress", {"signature_name": "regress_x_to_y", "examples": [{"x": 1.0}, {"x": 2.0}]}, [2.5, 3.0]),
    ("tf2:classify", {"signature_name": "classify_x_to_y", "examples": [{"x": 2.0}]}, [[["", 3.0]]]),
])
def test_tf_serving_answers(tfs: BrokerProcess, path: str, body: Any, results: Any) -> None:
    response = post(tfs, path, body)
    assert response.status_code == 200, response.text
    assert response.json() == {"results": results}
    assert response.headers["x-model-version"] == "123"


@pytest.mark.parametrize(("path", "body", "status", "error"), [
    ("half_plus_two:classify", {"signature_name": "classify_x_to_y"}, 400,
     "When method is classify, key 'examples' is expected and was not found"),
    ("half_plus_two:regress", {"signature_name": "regress_x_to_y", "examples": {"x": 1.0}}, 400,
     "Expecting 'examples' value to be an list/array"),
    ("half_plus_two:regress", {"signature_name": "regress_x_to_y", "examples": []}, 400,
     "'examples' value is an empty array"),
    ("half_plus_two:regress", {"signature_name": "regress_x_to_y", "examples": [[1.0]]}, 400,
     "Example must be JSON object but got JSON Array"),
    ("half_plus_two:regress", {"signature_name": "regress_x_to_y", "examples": [{"x": None}]}, 400,
     "Feature: x has element with unexpected JSON type: Null"),
    ("half_plus_two:regress", {"signature_name": "regress_x_to_y", "examples": [{"x": [1.0, "a"]}]}, 400,
     "Unexpected element type in feature: x expecting type: float"),
    ("half_plus_two:regress", {"signature_name": "nope", "examples": [{"x": 1.0}]}, 400,
     'Serving signature name: "nope" not found in signature def'),
    ("half_plus_two:classify", {"examples": [{"x": 1.0}]}, 400,
     "Expected classification signature method_name to be tensorflow/serving/classify. "
     "Was: tensorflow/serving/predict"),
    ("half_plus_two:classify", {"signature_name": "regress_x_to_y", "examples": [{"x": 1.0}]}, 400,
     "Expected classification signature method_name to be tensorflow/serving/classify. "
     "Was: tensorflow/serving/regress"),
    ("half_plus_two:regress", {"signature_name": "classify_x_to_y", "examples": [{"x": 1.0}]}, 400,
     "Expected regression signature method_name to be tensorflow/serving/regress. "
     "Was: tensorflow/serving/classify"),
    ("nosuchmodel:regress", {"examples": [{"x": 1.0}]}, 404, None),
])
def test_tf_serving_errors(tfs: BrokerProcess, path: str, body: Any, status: int, error: str | None) -> None:
    response = post(tfs, path, body)
    assert response.status_code == status, response.text
    if error:
        assert response.json() == {"error": error}
    assert post(tfs, "half_plus_two:regress", {"signature_name": "regress_x_to_y", "examples": [{"x": 1.0}]}
                ).json() == {"results": [2.5]}


def test_a_signature_that_takes_no_examples_is_a_400(tfs: BrokerProcess) -> None:
    response = post(tfs, "half_plus_two:regress", {"signature_name": "regress_x2_to_y3", "examples": [{"x": 1.0}]})
    assert response.status_code == 400, response.text


def test_the_python_client_classifies_serialized_examples(tfs: BrokerProcess) -> None:
    from tfbroker import Client
    from frontend.tf_example import parse_examples

    examples, _ = parse_examples(b'{"examples": [{"x": 1.0}, {"x": 3.0}]}', "classify")
    with Client(tfs.address) as client:
        result = client.classify("half_plus_two", examples, signature_name="classify_x_to_y")
    assert result.outputs["scores"].tolist() == [[2.5], [3.5]]
    assert result.version == 123


def test_a_null_among_numbers_names_the_tf1_model_s_dtype_in_either_form(tfs: BrokerProcess) -> None:
    for body in ({"instances": [1.0, None]}, {"inputs": [1.0, None]}, {"instances": [True, 1.0]}):
        response = tfs.predict("half_plus_two", body)
        assert response.status_code == 400, response.text
        value, kind = ("null", "Null") if None in next(iter(body.values())) else ("true", "True")
        assert response.json()["error"] == f"JSON Value: {value} Type: {kind} is not of expected type: float"
