"""The broker's view of its models: versions on disk, their state, and admission-time resolution."""

from __future__ import annotations

import enum
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from broker.batching import BatchQueue, Task
from broker.config import ModelConfig
from broker.errors import InvalidArgument, NotFound, Unavailable
from broker.protocol import STRING, can_cast
from broker.supervisor import Child

log = logging.getLogger("tfbroker.models")


class VersionState(enum.Enum):
    """TF Serving's ModelVersionStatus states."""

    START = "START"
    LOADING = "LOADING"
    AVAILABLE = "AVAILABLE"
    UNLOADING = "UNLOADING"
    END = "END"


def find_versions(base_path: str) -> dict[int, str]:
    """Numeric version directories under ``base_path`` (``00000123`` is version 123)."""
    try:
        names = os.listdir(base_path)
    except OSError as exc:
        log.error("cannot list model base path %s: %s", base_path, exc.strerror)
        return {}
    versions = {}
    for name in names:
        path = os.path.join(base_path, name)
        if name.isdigit() and os.path.isdir(path):
            versions[int(name)] = path
    return versions


@dataclass(slots=True)
class WorkerLink:
    """The broker's side of one worker process: its socket identity and its batches."""

    child: Child
    identity: bytes
    ready: bool = False
    last_heard: float = 0.0
    last_sent: float = 0.0
    in_flight: dict[int, list[Task]] = field(default_factory=dict)


@dataclass(slots=True)
class ServedVersion:
    model: str
    version: int
    path: str
    state: VersionState = VersionState.START
    error: str = ""
    signatures: dict[str, Any] = field(default_factory=dict)  # from READY: inputs/outputs specs
    signature_def: dict[str, Any] = field(default_factory=dict)
    queues: dict[str, BatchQueue] = field(default_factory=dict)
    worker: WorkerLink | None = None

    def status_json(self) -> dict[str, Any]:
        return {
            "version": str(self.version),
            "state": self.state.value,
            "status": {"error_code": "UNKNOWN" if self.error else "OK", "error_message": self.error},
        }


@dataclass(slots=True)
class ServedModel:
    config: ModelConfig
    versions: dict[int, ServedVersion] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.config.name

    def version_of_label(self, label: str) -> int:
        labels = dict(self.config.version_labels)
        if label not in labels:
            raise NotFound(f"Unrecognized servable version label: {label}")
        return labels[label]

    def resolve(self, version: int | None, label: str | None) -> ServedVersion:
        """The version a request is pinned to, chosen once at admission."""
        if label:
            version = self.version_of_label(label)
        if version is not None:
            served = self.versions.get(version)
            if served is None:
                raise NotFound(f"Servable not found for request: Specific({self.name}, {version})")
            if served.state is not VersionState.AVAILABLE:
                raise Unavailable(f"Servable not available for request: Specific({self.name}, {version}): "
                                  f"version is {served.state.value}{_because(served)}")
            return served
        available = [v for v in self.versions.values() if v.state is VersionState.AVAILABLE]
        if available:
            return max(available, key=lambda v: v.version)
        if not self.versions:
            raise NotFound(f"Servable not found for request: Latest({self.name})")
        newest = max(self.versions.values(), key=lambda v: v.version)
        raise Unavailable(f"Servable not available for request: Latest({self.name}): "
                          f"version {newest.version} is {newest.state.value}{_because(newest)}")


def _because(served: ServedVersion) -> str:
    return f" ({served.error})" if served.error else ""


def check_inputs(served: ServedVersion, signature_name: str, specs: Any, frames: list[Any]) -> int:
    """Validate a request's tensors against the signature; return its rows (batch dimension).

    Cheap checks on the header and frame lengths only: the broker never decodes tensors.
    """
    signature = served.signatures.get(signature_name)
    if signature is None:
        raise InvalidArgument(f'Serving signature name: "{signature_name}" not found in signature def')
    if not isinstance(specs, list) or len(specs) != len(frames):
        raise InvalidArgument("malformed request: tensor specs do not match the tensor frames")
    expected = signature["inputs"]
    given = set()
    rows: set[int] = set()
    scalar = False
    for spec, frame in zip(specs, frames):
        try:
            name, dtype, shape = spec
            shape = [int(d) for d in shape]
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(f"malformed tensor spec {spec!r}") from exc
        if name == "" and len(expected) == 1 and len(specs) == 1:
            name = next(iter(expected))  # an unnamed input is the signature's only input
        if name not in expected:
            raise InvalidArgument(f"input '{name}' is not an input of signature '{signature_name}'; "
                                  f"its inputs are {sorted(expected)}")
        want = expected[name][0]
        if not can_cast(dtype, want):
            raise InvalidArgument(f"input '{name}' has type {dtype}, which does not convert to the "
                                  f"signature's {want}")
        if any(d < 0 for d in shape):
            raise InvalidArgument(f"input '{name}' has a negative dimension: {shape}")
        if dtype != STRING and len(frame) != _nbytes(dtype, shape):
            raise InvalidArgument(f"input '{name}': {len(frame)} bytes do not fill shape {shape} of {dtype}")
        given.add(name)
        if shape:
            rows.add(shape[0])
        else:
            scalar = True
    missing = set(expected) - given
    if missing:
        raise InvalidArgument(f"signature '{signature_name}' needs inputs {sorted(missing)}, "
                              f"which the request lacks")
    if scalar or len(rows) != 1:
        return 1  # runs alone: nothing to batch along
    return rows.pop()


_ITEMSIZE: dict[str, int] = {}


def _nbytes(dtype: str, shape: list[int]) -> int:
    size = _ITEMSIZE.get(dtype)
    if size is None:
        try:
            size = _ITEMSIZE[dtype] = np.dtype(dtype).itemsize
        except TypeError as exc:
            raise InvalidArgument(f"unknown dtype {dtype!r}") from exc
    for d in shape:
        size *= d
    return size
