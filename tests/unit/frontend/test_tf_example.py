"""JSON examples to tf.Example protos (TF Serving's rules), read back with our own messages."""

from __future__ import annotations

import pytest

from tfbroker.wire.errors import InvalidArgument
from frontend.tf_example import Example, parse_examples


def features(serialized: bytes) -> dict[str, tuple[str, list[object]]]:
    example = Example.FromString(serialized)
    found = {}
    for name, feature in example.features.feature.items():
        kind = feature.WhichOneof("kind")
        found[name] = (kind, list(getattr(feature, kind).value))
    return found


def test_values_go_to_their_kind_and_context_is_merged() -> None:
    body = (b'{"context": {"c": [1, 2], "x": 9.0}, "examples": [{"x": 1.5, "s": "ab", "b": {"b64": "AAE="},'
            b' "t": true}, {"x": [2.0, 3.0]}], "signature_name": "sig"}')
    serialized, signature = parse_examples(body, "classify")
    assert signature == "sig"
    first, second = (features(s) for s in serialized)
    assert first == {"c": ("int64_list", [1, 2]), "x": ("float_list", [1.5]), "s": ("bytes_list", [b"ab"]),
                     "b": ("bytes_list", [b"\x00\x01"]), "t": ("int64_list", [1])}
    assert second == {"c": ("int64_list", [1, 2]), "x": ("float_list", [2.0, 3.0])}


@pytest.mark.parametrize(("body", "message"), [
    (b'{"examples": [{"x": [1, 1.5]}]}', "Unexpected element type in feature: x expecting type: int64"),
    (b'{"examples": [{"x": {"a": 1}}]}', "Feature: x has element with unexpected JSON type: Object"),
    (b'{"examples": [{"x": [[1]]}]}', "Feature: x has element with unexpected JSON type: Array"),
    (b'{"examples": [{"x": 18446744073709551615}]}', "Feature: x has uint64 element. Only int64 is supported."),
    (b'{"examples": [{"x": {"b64": "!!"}}]}', "Unable to base64 decode"),
    (b'{"examples": [1]}', "Example must be JSON object but got JSON Number"),
    (b'{"context": [], "examples": [{}]}', "Example must be JSON object but got JSON Array"),
    (b'[]', "not a JSON object"),
])
def test_tf_serving_refusals(body: bytes, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message.replace("(", r"\(").replace(".", r"\.")):
        parse_examples(body, "regress")
