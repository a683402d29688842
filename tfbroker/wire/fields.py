"""The bounds and field types every header of the wire protocol is checked against
(tfbroker/wire/protocol.py): a peer's message beyond them is malformed."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

# Bounds on what a header may hold (a peer's message beyond them is malformed).
MAX_NAME_CHARS = 256
MAX_RANK = 32
MAX_TENSORS = 256
MAX_TASKS = 1 << 16
MAX_DIM = 1 << 40
MAX_TIMEOUT_MS = 24 * 3600 * 1000
MAX_MESSAGE_CHARS = 1 << 16
MAX_CONFIG_CHARS = 1 << 22  # a model config sent with RELOAD
MAX_INT64 = (1 << 63) - 1

Id = Annotated[int, msgspec.Meta(ge=0, le=MAX_INT64)]
Version = Annotated[int, msgspec.Meta(ge=0, le=MAX_INT64)]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_NAME_CHARS)]
TensorName = Annotated[str, msgspec.Meta(max_length=MAX_NAME_CHARS)]  # "" is the only input
Count = Annotated[int, msgspec.Meta(ge=0, le=MAX_DIM)]
TimeoutMs = Annotated[int, msgspec.Meta(ge=0, le=MAX_TIMEOUT_MS)]
DType = Literal["float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16",
                "uint32", "uint64", "bool", "complex64", "complex128", "string"]
Shape = Annotated[tuple[Annotated[int, msgspec.Meta(ge=0, le=MAX_DIM)], ...], msgspec.Meta(max_length=MAX_RANK)]
Tasks = Annotated[list[Count], msgspec.Meta(max_length=MAX_TASKS)]
Micros = Annotated[int, msgspec.Meta(ge=0, le=MAX_INT64)]  # a duration, microseconds
Timeouts = Annotated[list[TimeoutMs], msgspec.Meta(max_length=MAX_TASKS)]
Json = dict[str, Any]
# A W3C trace context (tfbroker/runtime/tracing.py): version-traceid-spanid-flags, lowercase hex.
Traceparent = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")]
Traceparents = Annotated[list[Traceparent], msgspec.Meta(max_length=MAX_TASKS)]
