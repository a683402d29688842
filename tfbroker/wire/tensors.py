"""Tensors on the wire: one raw frame each, described by a TensorSpec in the message header.

Numeric frames are the C-contiguous buffer of the array (zero-copy on both sides); a
"string" frame is a msgpack array of byte strings. Also the dtype rules every peer shares:
which request dtype may feed which signature dtype, and TensorFlow's DataType names.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, NamedTuple, Sequence

import msgspec
import numpy as np

from tfbroker.wire.errors import ProtocolError
from tfbroker.wire.fields import DType
from tfbroker.wire.protocol import STRING, TensorSpec

Frame = bytes | memoryview

_encoder = msgspec.msgpack.Encoder()
_strings = msgspec.msgpack.Decoder(list[bytes])


class RawTensor(NamedTuple):
    """A numeric tensor already in its wire form: the row-major little-endian bytes of its
    values (gRPC's ``tensor_content``), forwarded as they are, never decoded here; the
    broker checks their length against the shape at admission."""

    dtype: DType
    shape: tuple[int, ...]
    data: Frame


def encode_tensors(tensors: Mapping[str, np.ndarray | RawTensor]) -> tuple[list[TensorSpec], list[Frame]]:
    """Specs and frames for named arrays; numeric buffers are not copied."""
    specs: list[TensorSpec] = []
    frames: list[Frame] = []
    for name, array in tensors.items():
        if isinstance(array, RawTensor):
            specs.append(TensorSpec(name, array.dtype, array.shape))
            frames.append(array.data)
        elif array.dtype.kind in "OSU":
            flat = [_as_bytes(v) for v in array.reshape(-1).tolist()]
            specs.append(TensorSpec(name, "string", array.shape))
            frames.append(_encoder.encode(flat))
        else:
            specs.append(TensorSpec(name, _NAMES.get(array.dtype) or array.dtype.name, array.shape))  # type: ignore[arg-type]
            if not array.flags.c_contiguous:
                array = array.copy()  # (np.ascontiguousarray would turn a scalar into shape [1])
            frames.append(memoryview(array).cast("B")  # type: ignore[arg-type]
                          if array.size and array.ndim else array.tobytes())
    return specs, frames


def decode_tensors(specs: Sequence[TensorSpec], frames: Sequence[Any]) -> dict[str, np.ndarray]:
    """Arrays from specs and frames; numeric arrays are read-only views of the frames."""
    if len(specs) != len(frames):
        raise ProtocolError(f"{len(specs)} tensor specs but {len(frames)} frames")
    tensors: dict[str, np.ndarray] = {}
    for spec, frame in zip(specs, frames):
        if spec.name in tensors:
            raise ProtocolError(f"tensor {spec.name!r} appears twice")
        size = math.prod(spec.shape)
        if spec.dtype == STRING:
            try:
                values = _strings.decode(frame)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                raise ProtocolError(f"tensor {spec.name!r}: {exc}") from exc
            if len(values) != size:
                raise ProtocolError(f"tensor {spec.name!r}: {len(values)} strings do not fill shape {spec.shape}")
            array = np.empty(len(values), dtype=object)
            array[:] = values
            tensors[spec.name] = array.reshape(spec.shape)
        else:
            dtype = _DTYPES[spec.dtype]
            if len(frame) != size * dtype.itemsize:
                raise ProtocolError(f"tensor {spec.name!r}: {len(frame)} bytes do not fill shape "
                                    f"{list(spec.shape)} of {spec.dtype}")
            tensors[spec.name] = np.frombuffer(frame, dtype=dtype).reshape(spec.shape)
    return tensors


def nbytes(spec: TensorSpec) -> int | None:
    """The frame length a numeric spec needs (None for strings)."""
    if spec.dtype == STRING:
        return None
    return int(math.prod(spec.shape) * _ITEMSIZE[spec.dtype])


def _as_bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    raise ProtocolError(f"string tensors hold bytes or str, not {type(value).__name__}")


_ITEMSIZE = {name: np.dtype(name).itemsize for name in DType.__args__ if name != STRING}  # type: ignore[attr-defined]
# The numeric dtypes and their names both ways: dtype.name and np.dtype(name) cost a
# microsecond each in numpy's Python code, on every tensor of every request.
_DTYPES = {name: np.dtype(name) for name in _ITEMSIZE}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}

# TensorFlow's names of our dtypes, as its error messages print them (DataTypeString).
TF_NAMES = {"float32": "float", "float64": "double", "float16": "half", "int8": "int8", "int16": "int16",
            "int32": "int32", "int64": "int64", "uint8": "uint8", "uint16": "uint16", "uint32": "uint32",
            "uint64": "uint64", "bool": "bool", "complex64": "complex64", "complex128": "complex128",
            STRING: "string"}


def can_cast(source: str, target: str) -> bool:
    """Whether a request tensor of dtype ``source`` may feed an input of dtype ``target``,
    by TF Serving's JSON rules (util/json_tensor.cc): numbers feed numbers, but a float never
    feeds an integer input and booleans and strings feed only their own kind. Whether each
    value fits (an integer in int32, a float in float32) is checked by the worker, which
    sees the values (workers/batch.py)."""
    if source == target:
        return True
    return (_KINDS.get(source), _KINDS.get(target)) in _CASTS


_KINDS = {**{name: np.dtype(name).kind for name in DType.__args__ if name != STRING}, STRING: "S"}  # type: ignore[attr-defined]
# (source kind, target kind): i signed, u unsigned, f float, c complex, b bool, S string.
_CASTS = frozenset({("i", "i"), ("i", "u"), ("u", "u"), ("u", "i"), ("i", "f"), ("u", "f"), ("f", "f"),
                    ("i", "c"), ("u", "c"), ("f", "c"), ("c", "c")})
