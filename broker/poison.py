"""Requests that killed their model's process, remembered so that repeating one cannot take
the model down again.

A kernel that aborts on values (a failed CHECK, the kind TensorFlow's security advisories
list) kills the worker whatever the broker checked at admission. When that happens the
requests it held run again one at a time (broker/inflight.py), so the one that kills is
alone on the worker when it dies: that request is answered 400 and its content (input specs and tensor bytes) is
refused at admission for REFUSE_FOR_S. The record is per version: a new version may mend it.
"""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

import msgspec

from tfbroker.wire import protocol

# How long a request that killed the model is refused, and how many are remembered per version.
REFUSE_FOR_S = 600.0
MOST_REMEMBERED = 256

KILLED_MESSAGE = "the model's process died on this request"

_specs = msgspec.msgpack.Encoder()


def content_key(specs: Sequence[protocol.TensorSpec], tensors: Sequence[Any]) -> bytes:
    """What identifies a request's content: its input specs and its tensors' bytes."""
    digest = hashlib.blake2b(_specs.encode(list(specs)), digest_size=16)
    for frame in tensors:
        digest.update(frame.buffer if hasattr(frame, "buffer") else frame)  # a zmq.Frame, or bytes
    return digest.digest()


class PoisonRecord:
    """The content keys of requests that killed a version's worker, each until it expires."""

    def __init__(self) -> None:
        self._until: dict[bytes, float] = {}

    def __bool__(self) -> bool:
        return bool(self._until)

    def remember(self, key: bytes, now: float) -> None:
        if len(self._until) >= MOST_REMEMBERED:
            del self._until[next(iter(self._until))]  # the oldest
        self._until[key] = now + REFUSE_FOR_S

    def refuses(self, key: bytes, now: float) -> float:
        """Seconds this content is still refused for (0: not refused)."""
        until = self._until.get(key)
        if until is None:
            return 0.0
        if now >= until:
            del self._until[key]
            return 0.0
        return until - now
