"""The Open Inference Protocol's tensors to what the broker takes, and model outputs back;
and what both of its APIs (frontend/oip_rest.py, frontend/oip_grpc.py) say of the server
and its models.

The protocol names its datatypes (``FP32``, ``INT64``, ``BYTES`` …) and gives every tensor
its whole shape, the batch included. Data comes three ways, and each stays as cheap as it
can be:

- JSON ``data``: nested or flat, row-major; it becomes an array of the datatype, its count
  checked against the shape;
- binary (Triton's binary tensor data extension, tritonclient's default over HTTP): a
  numeric tensor's bytes after the JSON header, forwarded to the broker as the frame they
  are (RawTensor: the broker checks the length against the shape), never decoded here;
- gRPC: the typed ``contents``, or ``raw_input_contents`` (tritonclient's default), the
  latter forwarded as it is, like binary.

``BYTES`` in binary form, either way, is each element's length (4 bytes, little-endian)
then its bytes. Outputs go back as JSON lists (flat, row-major) or, when asked, as binary
in the same layout.
"""

from __future__ import annotations

import math
import struct
from typing import Any, Sequence

import numpy as np

import tfbroker
from tfbroker.wire.errors import Internal, InvalidArgument, NotFound
from tfbroker.wire.fields import MAX_DIM, MAX_INT64, MAX_RANK
from tfbroker.wire.tensors import RawTensor

# The protocol's datatype -> the dtype the broker knows (tfbroker/wire/tensors.py).
DTYPES = {"BOOL": "bool", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32", "UINT64": "uint64",
          "INT8": "int8", "INT16": "int16", "INT32": "int32", "INT64": "int64", "FP16": "float16",
          "FP32": "float32", "FP64": "float64", "BYTES": "string"}
DATATYPES = {dtype: datatype for datatype, dtype in DTYPES.items()}
# TensorFlow's DataType names (a signature's) -> the protocol's datatype.
FROM_TF = {"DT_BOOL": "BOOL", "DT_UINT8": "UINT8", "DT_UINT16": "UINT16", "DT_UINT32": "UINT32",
           "DT_UINT64": "UINT64", "DT_INT8": "INT8", "DT_INT16": "INT16", "DT_INT32": "INT32", "DT_INT64": "INT64",
           "DT_HALF": "FP16", "DT_BFLOAT16": "BF16", "DT_FLOAT": "FP32", "DT_DOUBLE": "FP64", "DT_STRING": "BYTES"}
_LENGTH = struct.Struct("<I")
PLATFORM = "tensorflow_savedmodel"
SERVER_METADATA = {"name": "tfbroker", "version": tfbroker.__version__, "extensions": ["binary_tensor_data", "statistics",
                                                                                        "model_repository"]}


def version_or_label(text: str) -> tuple[int | None, str | None]:
    """A path's or request's version: a number, else a version label ("": the latest)."""
    if not text:
        return None, None
    if text.isdigit():
        if int(text) > MAX_INT64:
            raise InvalidArgument(f"version {text} is out of range")
        return int(text), None
    return None, text


def available_versions(status: dict[str, Any]) -> list[int]:
    """The versions of a STATUS answer a caller may ask for, newest first."""
    return sorted((int(v["version"]) for v in status["model_version_status"] if v.get("state") == "AVAILABLE"),
                  reverse=True)


def describe_model(model: str, versions: list[int], reply: dict[str, Any]) -> dict[str, Any]:
    """Model metadata: serving_default's inputs and outputs (-1: any size), from a METADATA answer."""
    signature = reply["signature_def"].get("signature_def", {}).get("serving_default")
    if signature is None:
        raise NotFound(f"model {model} has no serving_default signature to describe")
    return {"name": model, "versions": [str(v) for v in versions] or [str(reply["version"])],
            "platform": PLATFORM, "inputs": _tensors(signature.get("inputs", {})),
            "outputs": _tensors(signature.get("outputs", {}))}


def _tensors(infos: dict[str, Any]) -> list[dict[str, Any]]:
    described = []
    for name, info in sorted(infos.items()):
        shape = info.get("tensor_shape", {})
        dims = [-1] if shape.get("unknown_rank") else [int(d.get("size", -1)) for d in shape.get("dim", [])]
        described.append({"name": name, "datatype": FROM_TF.get(str(info.get("dtype")), "BYTES"), "shape": dims})
    return described


def datatype_dtype(name: str, datatype: Any) -> str:
    dtype = DTYPES.get(datatype) if isinstance(datatype, str) else None
    if dtype is None:
        raise InvalidArgument(f"input '{name}': datatype {datatype!r} is not one of {', '.join(DTYPES)}")
    return dtype


def checked_shape(name: str, shape: Any) -> tuple[int, ...]:
    if (not isinstance(shape, (list, tuple)) or len(shape) > MAX_RANK
            or not all(type(d) is int and 0 <= d <= MAX_DIM for d in shape)):
        raise InvalidArgument(f"input '{name}': shape must be a list of at most {MAX_RANK} dimensions, each "
                              f"0 to {MAX_DIM}; got {shape!r}")
    return tuple(shape)


def from_json_data(name: str, dtype: str, shape: tuple[int, ...], data: Any, *, literals: bool = True
                   ) -> np.ndarray:
    """A tensor from JSON ``data``, nested or flat, in row-major order. ``literals``: the
    body may hold true, false or null (when it cannot, the check for them is skipped)."""
    count = math.prod(shape)
    datatype = DATATYPES[dtype]
    if dtype != "string" and isinstance(data, list) and not literals:
        # The common case, numbers only (no true, false or null in the body), nested or flat:
        # numpy reads the lists itself, in C; anything else takes the careful way below.
        try:
            values = np.array(data)
        except (ValueError, OverflowError):
            values = None
        if values is not None and values.dtype.kind in "iuf" and values.size == count:
            return _numbers(name, dtype, datatype, values.reshape(-1), count).reshape(shape)
    flat = _flatten(name, data)
    if len(flat) != count:
        raise InvalidArgument(f"input '{name}': shape {list(shape)} holds {count} elements, data has {len(flat)}")
    if dtype == "string":
        array = np.empty(count, dtype=object)
        for i, value in enumerate(flat):
            if not isinstance(value, str):
                raise InvalidArgument(f"input '{name}': BYTES data must be strings, got {_json_type(value)}")
            array[i] = value.encode()
        return array.reshape(shape)
    try:
        values = np.array(flat)
    except (OverflowError, ValueError) as exc:
        raise InvalidArgument(f"input '{name}': data does not fit {datatype}: {exc}") from None
    kind = values.dtype.kind if count else ("b" if dtype == "bool" else "f")
    if (kind == "b") != (dtype == "bool") or kind not in "biuf" or (
            literals and kind != "b" and any(type(v) is bool or v is None for v in flat)):
        wrong = next((v for v in flat if (type(v) is bool) != (dtype == "bool") or v is None
                      or isinstance(v, (str, list, dict))), None)
        expected = "true or false" if dtype == "bool" else "numbers"
        raise InvalidArgument(f"input '{name}': {datatype} data must be {expected}, got {_json_type(wrong)}")
    return _numbers(name, dtype, datatype, values, count).reshape(shape)


def _numbers(name: str, dtype: str, datatype: str, values: np.ndarray, count: int) -> np.ndarray:
    """Numbers as ``dtype``, refused when one does not fit it."""
    kind = values.dtype.kind
    if dtype[0] in "iu":
        if kind == "f" and not np.all(np.mod(values, 1) == 0):
            raise InvalidArgument(f"input '{name}': {datatype} data must be integers")
        info = np.iinfo(dtype)
        if count and (values.min() < info.min or values.max() > info.max):
            raise InvalidArgument(f"input '{name}': a value is out of {datatype}'s range")
    elif dtype in ("float16", "float32") and count:
        finite = np.abs(values[np.isfinite(values)]) if kind == "f" else np.abs(values)
        if finite.size and finite.max() > np.finfo(dtype).max:
            raise InvalidArgument(f"input '{name}': a value is out of {datatype}'s range")
    return values.astype(dtype)


def from_binary(name: str, dtype: str, shape: tuple[int, ...], data: Any) -> np.ndarray | RawTensor:
    """A tensor from its binary form: numeric bytes as they are, BYTES elements decoded."""
    if dtype != "string":
        return RawTensor(dtype, shape, data)  # type: ignore[arg-type]
    return unpack_bytes(name, shape, data)


def unpack_bytes(name: str, shape: tuple[int, ...], data: Any) -> np.ndarray:
    view, count = memoryview(data), math.prod(shape)
    array = np.empty(count, dtype=object)
    at = 0
    for i in range(count):
        if at + 4 > len(view):
            raise InvalidArgument(f"input '{name}': binary BYTES data ends after {i} of {count} elements")
        (length,) = _LENGTH.unpack_from(view, at)
        at += 4
        if at + length > len(view):
            raise InvalidArgument(f"input '{name}': binary BYTES element {i} is cut short")
        array[i] = bytes(view[at:at + length])
        at += length
    if at != len(view):
        raise InvalidArgument(f"input '{name}': {len(view) - at} bytes of binary BYTES data beyond shape {list(shape)}")
    return array.reshape(shape)


def output_datatype(array: np.ndarray) -> str:
    if array.dtype.kind in "OSU":
        return "BYTES"
    datatype = DATATYPES.get(array.dtype.name)
    if datatype is None:
        raise Internal(f"the model's output of dtype {array.dtype.name} has no datatype in the protocol")
    return datatype


def to_binary(array: np.ndarray) -> bytes:
    """An output's binary form (row-major; BYTES as length-prefixed elements)."""
    if array.dtype.kind in "OSU":
        return b"".join(_LENGTH.pack(len(b)) + b for b in (_as_bytes(v) for v in array.reshape(-1)))
    return np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False).tobytes()


def to_json_data(array: np.ndarray) -> Any:
    """An output as a flat JSON list (strings as text; bytes that are not UTF-8 need binary output)."""
    flat = array.reshape(-1)
    if array.dtype.kind in "OSU":
        return [_as_bytes(v).decode("utf-8", errors="replace") for v in flat]
    return flat  # orjson writes a 1-D array itself (OPT_SERIALIZE_NUMPY)


def _as_bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def _flatten(name: str, data: Any) -> Sequence[Any]:
    if not isinstance(data, list):
        raise InvalidArgument(f"input '{name}': data must be a JSON array, got {_json_type(data)}")
    if not any(isinstance(item, list) for item in data):
        return data
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                if len(stack) > MAX_RANK:
                    raise InvalidArgument(f"input '{name}': data nests deeper than {MAX_RANK} levels")
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def _json_type(value: Any) -> str:
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "an array",
            dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)
