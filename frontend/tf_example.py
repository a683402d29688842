"""TF Serving's :classify and :regress bodies: JSON examples to serialized tf.Example protos,
and the model's outputs to ``{"results": …}``, without TensorFlow.

The protos are the frontend's compiled ones (frontend/grpc_messages.py: TensorFlow's names and
field numbers, tensorflow/core/example/{example,feature}.proto, in a private descriptor pool),
the same the gRPC API reads. The JSON rules are TF Serving's (util/json_tensor.cc): a feature's values
are a value or a list of values, all of one kind: integers and booleans go to int64_list,
other numbers to float_list (exact in float32), strings and ``{"b64": …}`` to bytes_list.
Context features are merged into every example, as TF Serving's servables do.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import numpy as np
import orjson
from frontend.grpc_messages import Example, Feature
from frontend.json_errors import json_kind, json_text
from tfbroker.wire.errors import Internal, InvalidArgument

_KIND_NAMES = {"bytes_list": "bytes", "float_list": "float", "int64_list": "int64"}
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def parse_examples(body: bytes, verb: str) -> tuple[list[bytes], str]:
    """(serialized tf.Examples, signature_name) from a :classify or :regress body."""
    try:
        request = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidArgument(f"JSON Parse error: {exc}") from exc
    if not isinstance(request, dict):
        raise InvalidArgument("JSON Value: the request body is not a JSON object")
    signature = request.get("signature_name", "serving_default")
    if not isinstance(signature, str):
        raise InvalidArgument(f"JSON Value: {json_text(signature)} not formatted correctly. 'signature_name' key must "
                              "be a string value.")
    context = _features(request["context"]) if "context" in request else None
    if "examples" not in request:
        raise InvalidArgument(f"When method is {verb}, key 'examples' is expected and was not found")
    examples = request["examples"]
    if not isinstance(examples, list):
        raise InvalidArgument("Expecting 'examples' value to be an list/array")
    if not examples:
        raise InvalidArgument("'examples' value is an empty array")
    serialized = []
    for value in examples:
        example = Example()
        if context is not None:
            for name, feature in context.items():
                example.features.feature[name].CopyFrom(feature)
        for name, feature in _features(value).items():
            example.features.feature[name].CopyFrom(feature)  # an example's own feature wins over the context's
        serialized.append(example.SerializeToString(deterministic=True))
    return serialized, signature


def format_results(verb: str, outputs: dict[str, np.ndarray], count: int) -> bytes:
    """``{"results": …}`` from the signature's outputs for ``count`` examples."""
    if verb == "regress":
        return orjson.dumps({"results": [_decimal(v) for v in regressions(outputs, count)]})
    return orjson.dumps({"results": [[[label, _decimal(score)] for label, score in row]
                                     for row in classifications(outputs, count)]})


def regressions(outputs: dict[str, np.ndarray], count: int) -> np.ndarray:
    """One value per example from a regress signature's ``outputs`` ([count] or [count, 1])."""
    values = outputs.get("outputs")
    if values is None or values.shape[:1] != (count,) or values.size != count:
        raise Internal(f"the regression output has shape {None if values is None else list(values.shape)}, "
                       f"expected [{count}] or [{count}, 1]")
    return values.reshape(-1)


def fill_classifications(result: Any, outputs: dict[str, np.ndarray], count: int) -> None:
    """A ClassificationResult (gRPC's answer, a request log's record) from a classify signature's outputs."""
    for row in classifications(outputs, count):
        classes = result.classifications.add()
        for label, score in row:
            classes.classes.add(label=label, score=float(score))


def fill_regressions(result: Any, outputs: dict[str, np.ndarray], count: int) -> None:
    """A RegressionResult (gRPC's answer, a request log's record) from a regress signature's outputs."""
    for value in regressions(outputs, count):
        result.regressions.add(value=float(value))


def classifications(outputs: dict[str, np.ndarray], count: int) -> list[list[tuple[str, Any]]]:
    """(label, score) pairs per example from a classify signature's ``classes`` and ``scores``
    ([count, k] each; a missing one gives "" labels or 0 scores, as TF Serving's)."""
    classes, scores = outputs.get("classes"), outputs.get("scores")
    present = classes if classes is not None else scores
    if present is None:
        raise Internal("the classification signature returned neither classes nor scores")
    shape = present.shape
    if len(shape) != 2 or shape[0] != count or (classes is not None and scores is not None
                                                 and classes.shape != scores.shape):
        raise Internal(f"classification outputs of shape {list(shape)} for {count} examples")
    return [[(_label(classes[i, j]) if classes is not None else "", scores[i, j] if scores is not None else 0.0)
             for j in range(shape[1])] for i in range(count)]


# --- implementation ---

def _features(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidArgument(f"Example must be JSON object but got JSON {json_kind(value)}")
    features = {}
    for name, content in value.items():
        feature = Feature()
        for item in content if isinstance(content, list) else [content]:
            _add_value(feature, name, item)
        features[name] = feature
    return features


def _add_value(feature: Any, name: str, value: Any) -> None:
    if value is None or isinstance(value, list) or (isinstance(value, dict) and not _is_b64(value)):
        raise InvalidArgument(f"Feature: {name} has element with unexpected JSON type: {json_kind(value)}")
    if isinstance(value, bool) or isinstance(value, int):
        _of_kind(feature, name, "int64_list")
        if value > (1 << 63) - 1:
            raise InvalidArgument(f"Feature: {name} has uint64 element. Only int64 is supported.")
        feature.int64_list.value.append(int(value))
    elif isinstance(value, float):
        _of_kind(feature, name, "float_list")
        if abs(value) > _FLOAT32_MAX and value == value and abs(value) != float("inf"):
            raise InvalidArgument(f"Cannot convert JSON value: {value:g} to float without loss of precision.")
        feature.float_list.value.append(value)
    elif isinstance(value, str):
        _of_kind(feature, name, "bytes_list")
        feature.bytes_list.value.append(value.encode())
    else:
        _of_kind(feature, name, "bytes_list")
        try:
            feature.bytes_list.value.append(base64.b64decode(value["b64"], validate=True))
        except binascii.Error as exc:
            raise InvalidArgument("Unable to base64 decode") from exc


def _of_kind(feature: Any, name: str, kind: str) -> None:
    current = feature.WhichOneof("kind")
    if current is None:
        getattr(feature, kind).SetInParent()
    elif current != kind:
        raise InvalidArgument(f"Unexpected element type in feature: {name} expecting type: {_KIND_NAMES[current]}")


def _is_b64(value: dict[str, Any]) -> bool:
    return len(value) == 1 and isinstance(value.get("b64"), str)


def _decimal(value: Any) -> float:
    """A float32 output in its shortest form (what TF Serving writes), as a Python float."""
    return float(str(np.float32(value))) if np.isfinite(value) else float(value)


def _label(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
