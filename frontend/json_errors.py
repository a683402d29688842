"""TF Serving's words for JSON that does not fit a signature (util/json_tensor.cc): its
TypeError, RapidJSON's names of types and its "Number too big" parse error, and the parse
itself where orjson is stricter than TF Serving (NaN, Infinity)."""

from __future__ import annotations

import json
import math
import re
from typing import Any

import orjson

from tfbroker.wire.errors import InvalidArgument


class JsonTypeError(InvalidArgument):
    """TF Serving's TypeError (``JSON Value: null Type: Null is not of expected type: float``),
    found while parsing, before the input's dtype is known: the frontend names the dtype from
    the model's metadata (``with_dtype``), on this error path only, and then the value is the
    first of the input's that does not fit that dtype, as TF Serving walks them."""

    def __init__(self, name: str, values: list[Any], expected: str = "a number") -> None:
        self.name, self.values = name, values
        bad = _first_misfit(values, expected)
        super().__init__(f"JSON Value: {json_text(bad)} Type: {json_kind(bad)} is not of expected type: {expected}")

    def with_dtype(self, expected: str) -> JsonTypeError:
        return JsonTypeError(self.name, self.values, expected)


def _first_misfit(values: list[Any], expected: str) -> Any:
    """The first value TF Serving's AddValueToTensor refuses for ``expected`` (a dtype's name;
    "a number" while the dtype is unknown)."""
    if expected == "string":
        fits = lambda v: isinstance(v, str) or (isinstance(v, dict) and "b64" in v)  # noqa: E731
    elif expected == "bool":
        fits = lambda v: isinstance(v, bool)  # noqa: E731
    else:
        fits = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    return next((v for v in values if not fits(v)), values[0] if values else None)


def json_kind(value: Any) -> str:
    """RapidJSON's name of a value's type (json_tensor.cc: JsonTypeString)."""
    if value is None:
        return "Null"
    if isinstance(value, bool):
        return "True" if value else "False"
    kinds: dict[type, str] = {str: "String", dict: "Object", list: "Array"}
    return kinds.get(type(value), "Number")


def json_text(value: Any) -> str:
    """A value as RapidJSON writes it in TF Serving's messages (JsonValueToDebugString)."""
    return orjson.dumps(value).decode() if not isinstance(value, float) or math.isfinite(value) else str(value)


def flat(value: Any) -> list[Any]:
    """A JSON value's leaves, in order."""
    values = value if isinstance(value, list) else [value]
    while any(isinstance(v, list) for v in values):
        values = [v for row in values for v in (row if isinstance(row, list) else [row])]
    return values


def refuse_non_numbers(value: Any, name: str) -> None:
    """TF Serving's TypeError for a null, a boolean or a string among numbers, or an integer
    beyond 64 bits."""
    values = flat(value)
    kinds = {type(v) for v in values}
    for v in values:
        if v is None or (isinstance(v, bool) and len(kinds) > 1) or isinstance(v, (str, dict)):
            raise JsonTypeError(name, values)
        if isinstance(v, int) and not isinstance(v, bool) and not -(1 << 63) <= v < (1 << 64):
            raise InvalidArgument(f"input '{name}': JSON Value: {v} Type: Number does not fit a 64-bit integer")


# RapidJSON (TF Serving's parser, without kParseFullPrecisionFlag) refuses a number whose
# decimal exponent is over 308 (beyond what its fraction digits allow) or whose significand
# reaches 1.8e307 before its exponent: "Number too big to be stored in double".
_NUMBER = re.compile(rb"-?(\d+)(?:\.(\d+))?(?:[eE]([+-]?\d+))?")


def _too_big(token: str) -> bool:
    match = _NUMBER.fullmatch(token.encode())
    if match is None:
        return False
    digits, fraction, exponent = match.groups()
    if len(digits.lstrip(b"0")) > 308:
        return True
    return exponent is not None and int(exponent) > 308 + len(fraction or b"")


def _number_too_big(body: bytes, token: str) -> InvalidArgument:
    return InvalidArgument(f"JSON Parse error: Number too big to be stored in double. at offset: "
                           f"{max(body.find(token.encode()), 0)}")


def parse_leniently(body: bytes, error: Exception) -> Any:
    """JSON with NaN, Infinity and -Infinity, which TF Serving takes (and orjson does not);
    a number too big for a double is TF Serving's parse error."""
    if b"NaN" not in body and b"Infinity" not in body and "infinity" not in str(error):
        raise InvalidArgument(f"JSON Parse error: {error}") from error

    def number(token: str, kind: type) -> Any:
        if _too_big(token):
            raise _number_too_big(body, token)
        return kind(token)

    try:
        return json.loads(body, parse_float=lambda t: number(t, float), parse_int=lambda t: number(t, int))
    except InvalidArgument:
        raise
    except ValueError as exc:
        raise InvalidArgument(f"JSON Parse error: {exc}") from exc
