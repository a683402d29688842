"""TensorProto to what the broker takes, and model outputs back to TensorProto, as TensorFlow
reads and writes them (tensorflow/core/framework/tensor.cc), without TensorFlow.

In: a ``tensor_content`` tensor is forwarded as the raw frame it already is (RawTensor: its
length is checked against the shape by the broker, never decoded here); a tensor in typed
fields (``float_val``, ``int_val``, …) becomes an array, as TensorFlow reads it: no value
gives zeros, fewer values than the shape holds repeat the last one, more are cut. Out:
typed fields (TF Serving's default), or ``tensor_content`` with
``--enable_serialization_as_tensor_content``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from frontend.grpc_messages import DATA_TYPES, TensorProto
from tfbroker.wire.errors import InvalidArgument
from tfbroker.wire.fields import MAX_DIM, MAX_RANK
from tfbroker.wire.tensors import RawTensor

# DataType name -> (numpy dtype, the typed field holding its values).
_TYPES: dict[str, tuple[str, str]] = {
    "DT_FLOAT": ("float32", "float_val"), "DT_DOUBLE": ("float64", "double_val"),
    "DT_HALF": ("float16", "half_val"),
    "DT_INT8": ("int8", "int_val"), "DT_INT16": ("int16", "int_val"), "DT_INT32": ("int32", "int_val"),
    "DT_INT64": ("int64", "int64_val"), "DT_UINT8": ("uint8", "int_val"), "DT_UINT16": ("uint16", "int_val"),
    "DT_UINT32": ("uint32", "uint32_val"), "DT_UINT64": ("uint64", "uint64_val"),
    "DT_BOOL": ("bool", "bool_val"), "DT_STRING": ("string", "string_val"),
    "DT_COMPLEX64": ("complex64", "scomplex_val"), "DT_COMPLEX128": ("complex128", "dcomplex_val"),
}
_BY_NUMBER = {DATA_TYPES[name]: (name, *kinds) for name, kinds in _TYPES.items()}
_BY_DTYPE = {dtype: (DATA_TYPES[name], field) for name, (dtype, field) in _TYPES.items()}
_NAMES = {number: name for name, number in DATA_TYPES.items()}


def from_proto(name: str, proto: Any) -> np.ndarray | RawTensor:
    """One input tensor, ready for the broker; InvalidArgument names what is wrong with it."""
    kind = _BY_NUMBER.get(proto.dtype)
    if kind is None:
        shown = _NAMES.get(proto.dtype, str(proto.dtype))
        raise InvalidArgument(f"input '{name}': tensor of type {shown} is not supported")
    _, dtype, field = kind
    shape = _shape(name, proto)
    if proto.tensor_content:
        if dtype == "string":
            raise InvalidArgument(f"input '{name}': a string tensor carries its values in string_val, "
                                  "not tensor_content")
        return RawTensor(dtype, shape, proto.tensor_content)  # type: ignore[arg-type]
    count = math.prod(shape)
    values = getattr(proto, field)
    if dtype == "string":
        flat = np.empty(count, dtype=object)
        if count:
            strings = list(values[:count]) or [b""]
            flat[:len(strings)] = strings
            flat[len(strings):] = strings[-1]
        return flat.reshape(shape)
    if dtype == "float16":
        array = np.array(values, dtype=np.uint16).view(np.float16)
    elif dtype.startswith("complex"):
        pairs = np.array(values, dtype=np.float32 if dtype == "complex64" else np.float64)
        if len(pairs) % 2:
            raise InvalidArgument(f"input '{name}': complex values come in (real, imaginary) pairs")
        array = pairs.view(dtype)
    elif field == "int_val":  # int32 on the wire, cast to the narrower type as TensorFlow does
        array = np.array(values, dtype=np.int32).astype(dtype)
    else:
        array = np.array(values, dtype=dtype)
    if len(array) == count:
        return array.reshape(shape)
    if not len(array):
        return np.zeros(shape, dtype=dtype)
    filled = np.empty(count, dtype=dtype)
    taken = min(len(array), count)
    filled[:taken] = array[:taken]
    filled[taken:] = array[taken - 1]
    return filled.reshape(shape)


def to_proto(array: np.ndarray, *, as_content: bool = False) -> Any:
    """An output tensor: typed fields, or ``tensor_content`` (numeric only) when asked."""
    proto = TensorProto()
    dtype = "string" if array.dtype == object else array.dtype.name
    number, field = _BY_DTYPE[dtype]
    proto.dtype = number
    for size in array.shape:
        proto.tensor_shape.dim.add(size=size)
    if dtype == "string":
        proto.string_val.extend(array.reshape(-1).tolist())
    elif as_content:
        proto.tensor_content = np.ascontiguousarray(array).tobytes()
    elif dtype == "float16":
        proto.half_val.extend(array.reshape(-1).view(np.uint16).tolist())
    elif dtype.startswith("complex"):
        getattr(proto, field).extend(array.reshape(-1).view(array.real.dtype).tolist())
    else:
        getattr(proto, field).extend(array.reshape(-1).tolist())
    return proto


def _shape(name: str, proto: Any) -> tuple[int, ...]:
    if proto.tensor_shape.unknown_rank:
        raise InvalidArgument(f"input '{name}': a tensor needs a known shape")
    dims = tuple(dim.size for dim in proto.tensor_shape.dim)
    if len(dims) > MAX_RANK or any(not 0 <= d <= MAX_DIM for d in dims):
        raise InvalidArgument(f"input '{name}': shape {list(dims)} is not a valid tensor shape")
    return dims
