"""TF Serving's JSON tensor formats (api_rest.md) to numpy arrays and back.

Requests: row format (``"instances"``: a list, one element per row; elements are objects
when the signature has several named inputs) or columnar format (``"inputs"``: a value, or
an object of named values). Binary strings are ``{"b64": "..."}``.

Responses: row format answers ``{"predictions": [...]}``, one element per row (objects when
there are several outputs); columnar answers ``{"outputs": ...}``. String outputs whose name
ends in ``_bytes``, or that are not UTF-8, are written as ``{"b64": "..."}``.

Numbers are parsed as int64 or float64 (uint64 beyond int64; integers beyond 64 bits as
float64, as TF Serving's parser reads them) and converted to the signature's types by the
worker under TF Serving's rules: the broker refuses a dtype that does not fit (a float for
an integer input, a number for a bool or a string input), the worker a value that does not
(an integer beyond int32, one beyond 2**24 - 1 for float32). A null, or a boolean among
numbers, is refused here. NaN, Infinity and -Infinity are taken and written as those words.

Every request is held to RequestLimits (broker/config.py): the rank of a value, the number
of instances, the length of a string and the bytes of all tensors are checked from the
parsed JSON before any array is built.
"""

from __future__ import annotations

import base64
import binascii
import math
from typing import Any

import numpy as np
import orjson

from frontend.json_errors import JsonTypeError, flat, json_text, parse_leniently, refuse_non_numbers
from tfbroker.runtime.settings import RequestLimits
from tfbroker.wire.errors import InvalidArgument

SINGLE_INPUT = ""  # the name used when a request does not name its only input


DEFAULT_LIMITS = RequestLimits()


def parse_predict_body(body: bytes, limits: RequestLimits = DEFAULT_LIMITS) -> tuple[dict[str, np.ndarray], str, bool]:
    """(inputs, signature_name, row_format) from a :predict request body."""
    try:
        request = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        request = parse_leniently(body, exc)
    if not isinstance(request, dict):
        raise InvalidArgument("JSON Value: the request body is not a JSON object")
    signature = request.get("signature_name", "serving_default")
    if not isinstance(signature, str):
        raise InvalidArgument("'signature_name' must be a string")
    has_instances, has_inputs = "instances" in request, "inputs" in request
    if has_instances == has_inputs:
        raise InvalidArgument("Missing 'inputs' or 'instances' key" if not has_instances else
                              "Not both 'inputs' and 'instances' can be specified in the request")
    parser = _Parser(limits, mixed_types=_may_hold_literals(body))
    if has_instances:
        return parser.instances(request["instances"]), signature, True
    return parser.columns(request["inputs"]), signature, False


def format_predictions(outputs: dict[str, np.ndarray], row_format: bool) -> bytes:
    """TF Serving's JSON: floats in their shortest form that reads back the same (float32 as
    float32), whole ones with ".0"; NaN, Infinity and -Infinity as those bare words."""
    text = _dump(outputs, row_format)
    # orjson writes NaN and infinities as null: only then, write the floats again the slow way.
    if b"null" in text and any(v.dtype.kind == "f" and not np.isfinite(v).all() for v in outputs.values()):
        marked = {n: _mark_non_finite(v) if v.dtype.kind == "f" else v for n, v in outputs.items()}
        text = _dump(marked, row_format)
        for word in _NON_FINITE.values():
            text = text.replace(b'"' + _MARK + word + b'"', word)
    return text


def _dump(outputs: dict[str, np.ndarray], row_format: bool) -> bytes:
    if row_format:
        return orjson.dumps({"predictions": _rows(outputs)}, option=orjson.OPT_SERIALIZE_NUMPY)
    if len(outputs) == 1:
        (name, value), = outputs.items()
        return orjson.dumps({"outputs": _jsonable(name, value)}, option=orjson.OPT_SERIALIZE_NUMPY)
    return orjson.dumps({"outputs": {n: _jsonable(n, v) for n, v in outputs.items()}},
                        option=orjson.OPT_SERIALIZE_NUMPY)


# --- implementation ---

_MARK = b"\\u0000"  # how orjson writes the NUL that marks a non-finite float in the slow path
_NON_FINITE = {"nan": b"NaN", "inf": b"Infinity", "-inf": b"-Infinity"}


def _mark_non_finite(value: np.ndarray) -> np.ndarray:
    """An object array where each non-finite float is a marked string, each other a Python
    float in the source precision's shortest form (replaced in the JSON text afterwards)."""
    marked = np.empty(value.shape, dtype=object)
    for index, v in np.ndenumerate(value):
        if np.isfinite(v):
            marked[index] = float(repr(v.item()) if value.dtype == np.float64 else str(v))
        else:
            marked[index] = "\u0000" + _NON_FINITE[str(float(v))].decode()
    return marked

class _Parser:
    """JSON values to arrays, within the limits; counts the bytes of the request's tensors."""

    def __init__(self, limits: RequestLimits, mixed_types: bool) -> None:
        self.limits = limits
        self.tensor_bytes = 0
        self.mixed_types = mixed_types  # the body has booleans or nulls: check numeric values for them

    def instances(self, instances: Any) -> dict[str, np.ndarray]:
        if not isinstance(instances, list) or not instances:
            raise InvalidArgument("'instances' must be a non-empty JSON list")
        if len(instances) > self.limits.max_instances:
            raise InvalidArgument(f"{len(instances)} instances exceed the limit of {self.limits.max_instances}")
        if all(isinstance(row, dict) and "b64" not in row for row in instances):
            names = set(instances[0])
            for i, row in enumerate(instances):
                if set(row) != names:
                    raise InvalidArgument(f"instance {i} has inputs {sorted(row)}, instance 0 has {sorted(names)}: "
                                          "every instance must name the same inputs")
            arrays = {}
            for name in sorted(names):
                values = [row[name] for row in instances]
                try:
                    arrays[name] = self.array(values, name)
                except RaggedList:
                    raise InvalidArgument(_instances_error(values, name)) from None
            return arrays
        if any(isinstance(row, dict) and "b64" not in row for row in instances):
            raise InvalidArgument("'instances' mixes named (object) and unnamed values")
        try:
            return {SINGLE_INPUT: self.array(instances, "instances")}
        except RaggedList:
            raise InvalidArgument(_instances_error(instances, "")) from None

    def columns(self, inputs: Any) -> dict[str, np.ndarray]:
        if isinstance(inputs, dict) and "b64" not in inputs:
            if not inputs:
                raise InvalidArgument("'inputs' names no input")
            arrays = {}
            for name, value in inputs.items():
                try:
                    arrays[name] = self.array(value, name)
                except RaggedList:
                    raise InvalidArgument(f"input '{name}': {_dense_error(value) or 'the list is ragged'}") from None
            return arrays
        try:
            return {SINGLE_INPUT: self.array(inputs, "inputs")}
        except RaggedList:
            raise InvalidArgument(f"'inputs': {_dense_error(inputs) or 'the list is ragged'}") from None

    def array(self, value: Any, name: str) -> np.ndarray:
        # The shape along the first elements: enough for the limits, and cheap (numpy finds
        # ragged lists; strings are walked in full when their array is built).
        shape = _first_shape(value, name, self.limits.max_json_depth)
        if shape and shape[0] > self.limits.max_instances:
            raise InvalidArgument(f"input '{name}': {shape[0]} rows exceed the limit of {self.limits.max_instances}")
        # Refuse before allocating: numbers take 8 bytes each as int64 or float64.
        self._count(math.prod(shape) * 8, name)
        if _holds_strings(value):
            array = _string_array(value, name, self.limits.max_string_bytes)
            self._count(sum(len(v) for v in array.reshape(-1)) - math.prod(shape) * 8, name)
            return array
        array = _to_array(value, name)
        if self.mixed_types and array.dtype.kind != "b":
            refuse_non_numbers(value, name)
        return array

    def _count(self, nbytes: int, name: str) -> None:
        self.tensor_bytes += nbytes
        if self.tensor_bytes > self.limits.max_tensor_bytes:
            raise InvalidArgument(f"input '{name}': the request's tensors exceed the limit of "
                                  f"{self.limits.max_tensor_bytes} bytes")


def _to_array(value: Any, name: str) -> np.ndarray:
    try:
        array = np.array(value)
    except (ValueError, OverflowError) as exc:
        if "inhomogeneous" in str(exc) or "sequence" in str(exc):
            raise RaggedList(name) from exc
        raise InvalidArgument(f"input '{name}': {exc}") from exc
    if array.dtype.kind not in "biuf":
        refuse_non_numbers(value, name)
        raise InvalidArgument(f"input '{name}' holds values that are not numbers, booleans or strings")
    if array.dtype.kind == "u" and array.max() <= np.iinfo(np.int64).max:
        array = array.astype(np.int64)  # (uint64 only for values beyond int64)
    return array


def _may_hold_literals(body: bytes) -> bool:
    """Whether the body may hold true, false or null (then numeric values are checked for
    them); one-byte searches first, as most bodies hold neither an "l" nor a "u"."""
    return (b"l" in body and (b"false" in body or b"null" in body)) or (b"u" in body and b"true" in body)


def _holds_strings(value: Any) -> bool:
    while isinstance(value, list) and value:
        value = value[0]
    return isinstance(value, str) or (isinstance(value, dict) and "b64" in value)


def _string_array(value: Any, name: str, max_bytes: int) -> np.ndarray:
    def convert(item: Any) -> Any:
        if isinstance(item, list):
            return [convert(v) for v in item]
        if isinstance(item, str):
            data = item.encode()
        elif isinstance(item, dict) and set(item) == {"b64"} and isinstance(item["b64"], str):
            if len(item["b64"]) // 4 * 3 > max_bytes:  # refused before it is decoded
                raise InvalidArgument(f"input '{name}': a string exceeds the limit of {max_bytes} bytes")
            try:
                data = base64.b64decode(item["b64"], validate=True)
            except binascii.Error as exc:
                raise InvalidArgument(f"input '{name}': invalid base64: {exc}") from exc
        else:
            raise JsonTypeError(name, flat(value), "string")
        if len(data) > max_bytes:
            raise InvalidArgument(f"input '{name}': a string exceeds the limit of {max_bytes} bytes")
        return data

    return _object_array(convert(value), name)


def _first_shape(value: Any, name: str, max_rank: int) -> tuple[int, ...]:
    shape: list[int] = []
    while isinstance(value, list):
        if len(shape) >= max_rank:
            raise InvalidArgument(f"input '{name}' is nested deeper than the limit of {max_rank} levels")
        shape.append(len(value))
        if not value:
            break
        value = value[0]
    return tuple(shape)


def _shape_of(value: Any, name: str) -> tuple[int, ...]:
    shape: list[int] = []
    while isinstance(value, list):
        shape.append(len(value))
        if not value:
            break
        lengths = {len(v) if isinstance(v, list) else -1 for v in value}
        if len(lengths) != 1:
            raise RaggedList(name)
        value = value[0]
    return tuple(shape)


def _object_array(value: Any, name: str) -> np.ndarray:
    # numpy would turn a list of equal-length bytes into a fixed-width bytes array: build
    # the object array by hand, element by element.
    array = np.empty(_shape_of(value, name), dtype=object)
    for index in np.ndindex(array.shape):
        item = value
        for i in index:
            item = item[i]
        array[index] = item
    return array


class RaggedList(InvalidArgument):
    """Lists of different lengths where a tensor needs one shape; its caller words it as TF
    Serving's json_tensor.cc does (_dense_error, _instances_error)."""

    def __init__(self, name: str) -> None:
        super().__init__(f"input '{name}': the list is ragged (rows of different lengths)")


def _dense_error(value: Any) -> str | None:
    """TF Serving's words for a value that is not one dense tensor: its shape is read along
    the first elements, then every list must have that shape's size at its level."""
    return _fill_error(value, list(_first_shape(value, "", 1 << 30)), 0)


def _fill_error(value: Any, shape: list[int], level: int) -> str | None:
    rank = len(shape)
    if not isinstance(value, list):
        if level != rank:
            return (f"JSON Value: {json_text(value)} found at incorrect level: {level + 1} in the JSON DOM. "
                    f"Expected at level: {rank}")
        return None
    if level >= rank:
        return f"Encountered list at unexpected level: {level} expected < {rank}"
    if len(value) != shape[level]:
        return f"Encountered list at unexpected size: {len(value)} at level: {level} expected size: {shape[level]}"
    for item in value:
        error = _fill_error(item, shape, level + 1)
        if error:
            return error
    return None


def _instances_error(elements: list[Any], name: str) -> str:
    """TF Serving's words for instances that do not make one tensor: the element, and why."""
    where = f"{{}} key: {name}" if name else "{}"
    first_shape = None
    for index, element in enumerate(elements):
        error = _dense_error(element)
        shape = [] if error else list(_first_shape(element, name, 1 << 30))
        if error is None and first_shape is not None and shape != first_shape:
            size, first_size = math.prod(shape), math.prod(first_shape)
            error = (f"Expecting tensor size: {first_size} but got: {size}" if size != first_size else
                     f"Expecting shape [{','.join(map(str, first_shape))}] but got: [{','.join(map(str, shape))}]")
        if error:
            return (f"Failed to process element: {where.format(index)} of 'instances' list. "
                    f"Error: INVALID_ARGUMENT: {error}")
        if first_shape is None:
            first_shape = shape
    return "the 'instances' list is ragged"


def _rows(outputs: dict[str, np.ndarray]) -> Any:
    if len(outputs) == 1:
        (name, value), = outputs.items()
        return _jsonable(name, value)
    sizes = {np.shape(v)[0] if np.ndim(v) else None for v in outputs.values()}
    if len(sizes) != 1 or None in sizes:
        raise InvalidArgument("Tensors with different batch sizes cannot be returned in row format; "
                              "use the columnar format ('inputs')")
    # Rows as numpy rows and scalars, not .tolist()'s Python floats: orjson writes a float32
    # in its own shortest form (1.8), a Python float in a double's (1.7999999523162842).
    columns = {n: _jsonable(n, v) for n, v in outputs.items()}
    count: int = sizes.pop()  # type: ignore[assignment]  # (None was refused above)
    return [{n: columns[n][i] for n in outputs} for i in range(count)]


def _jsonable(name: str, value: np.ndarray) -> Any:
    if value.dtype.kind not in "OSU":
        return value if value.ndim else value[()]  # (orjson writes arrays of rank 1 and up, and numpy scalars)
    return _strings_to_json(value.tolist(), name.endswith("_bytes"))


def _strings_to_json(value: Any, binary: bool) -> Any:
    if isinstance(value, list):
        return [_strings_to_json(v, binary) for v in value]
    if isinstance(value, bytes):
        if not binary:
            try:
                return value.decode()
            except UnicodeDecodeError:
                pass
        return {"b64": base64.b64encode(value).decode()}
    return value
