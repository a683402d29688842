"""What travels between the broker and an I/O batcher for one lookup batch: the raw inputs
each request's lookups take (a LookupBatch), and each request rebuilt for its model with the
looked-up tensors in place of those inputs. Pure functions over frames, like batch_codec.py.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from msgspec import structs

from broker.batching import Task
from broker.inflight import Pending
from broker.models import ServedVersion
from tfbroker.wire import protocol


def build_lookup_batch(batch_id: int, served: ServedVersion, tasks: Sequence[Task],
                       now: float) -> tuple[protocol.LookupBatch, list[Any]]:
    """The LOOKUP batch for ``tasks``: of each request, the inputs a lookup of its version takes."""
    names = {lk.input for lk in served.lookups}
    counts: list[int] = []
    specs: list[protocol.TensorSpec] = []
    frames: list[Any] = []
    for task in tasks:
        request: protocol.Request = task.payload.request
        picked = [(spec, frame) for spec, frame in zip(request.inputs, task.payload.frames[1:])
                  if _input_name(spec, served, request.signature) in names]
        counts.append(len(picked))
        specs.extend(structs.replace(spec, name=_input_name(spec, served, request.signature)) for spec, _ in picked)
        frames.extend(frame for _, frame in picked)
    # Time left for each task, rounded up: a task due in 0.3 ms still has time.
    timeouts = [max(1, math.ceil((t.deadline - now) * 1000)) for t in tasks]
    header = protocol.LookupBatch(batch=batch_id, model=served.model, version=served.version, counts=counts,
                                  timeouts_ms=timeouts, inputs=specs)
    return header, frames


def model_request(served: ServedVersion, pending: Pending, outputs: Sequence[protocol.TensorSpec],
                  looked_up: Sequence[Any]) -> tuple[protocol.Request, list[Any]]:
    """The request for its model: its other inputs as they came, the looked-up tensors in place
    of the raw inputs; its header and the frames to forward (the header frame first)."""
    request = pending.request
    if request is None:
        raise ValueError("a request reaches the lookup stage with its header")
    names = {lk.input for lk in served.lookups}
    kept = [(spec, frame) for spec, frame in zip(request.inputs, pending.frames[1:])
            if _input_name(spec, served, request.signature) not in names]
    rebuilt = structs.replace(request, inputs=[spec for spec, _ in kept] + list(outputs))
    return rebuilt, [protocol.encode_header(rebuilt), *[frame for _, frame in kept], *looked_up]


def _input_name(spec: protocol.TensorSpec, served: ServedVersion, signature: str) -> str:
    """An unnamed input is the signature's only one."""
    if spec.name:
        return spec.name
    inputs = served.signatures.get(signature)
    return next(iter(inputs.inputs)) if inputs is not None and len(inputs.inputs) == 1 else ""
