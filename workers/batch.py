"""Running one BATCH: concatenate the tasks' inputs, pad, run, split, one answer per task.

Every task gets exactly its own rows back, or its own error. A batch that fails with an
InvalidArgument error is run again task by task, so one bad request fails alone.

A joined BATCH (see broker/protocol.py) arrives already concatenated, one tensor per
input; ``run_joined`` answers it with one tensor per output when it can, so the worker's
Python work is per batch, not per task.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from broker import protocol
from broker.errors import Internal, InvalidArgument, TFBrokerError
from workers.model import Signature

log = logging.getLogger(__name__)


@dataclass(slots=True)
class TaskInput:
    request_id: int
    inputs: dict[str, np.ndarray]
    rows: int


Outcome = dict[str, np.ndarray] | TFBrokerError


@dataclass(slots=True)
class JoinedBatch:
    """The tasks of a joined BATCH: their ids, their rows, and their inputs end to end."""

    ids: list[int]
    rows: list[int]
    inputs: dict[str, np.ndarray]

    def split(self) -> list[TaskInput]:
        return [TaskInput(request_id, part, rows)
                for request_id, rows, part in zip(self.ids, self.rows, cut_rows(self.inputs, self.rows))]


def cut_rows(arrays: dict[str, np.ndarray], rows: Sequence[int]) -> list[dict[str, np.ndarray]]:
    """Consecutive slices of every array: the first ``rows[0]`` rows, then the next ``rows[1]``…"""
    parts, start = [], 0
    for count in rows:
        parts.append({name: a[start:start + count] for name, a in arrays.items()})
        start += count
    return parts


def decode_batch(frames: Sequence[Any], counts: Sequence[int]) -> list[TaskInput]:
    """Split a BATCH's payload into its tasks (request header, then tensors, per task)."""
    tasks: list[TaskInput] = []
    offset = 0
    for count in counts:
        header = protocol.unpackb(frames[offset])
        tensors = protocol.decode_tensors(header["inputs"], frames[offset + 1:offset + count])
        offset += count
        rows = next(iter(tensors.values())).shape[0] if tensors else 0
        tasks.append(TaskInput(header["id"], tensors, rows))
    return tasks


def encode_outcome(request_id: int, model: str, version: int, outcome: Outcome) -> list[Any]:
    """The client message for one task: REPLY with its tensors, or ERROR."""
    if isinstance(outcome, TFBrokerError):
        header = {"id": request_id, "code": outcome.http_status, "message": outcome.message}
        return [protocol.ERROR, protocol.packb(header)]
    specs, frames = protocol.encode_tensors(outcome)
    header = {"id": request_id, "model": model, "version": version, "outputs": specs}
    return [protocol.REPLY, protocol.packb(header), *frames]


def run_batch(signature: Signature, tasks: Sequence[TaskInput | TFBrokerError],
              padded_rows: int) -> list[Outcome]:
    """One outcome per task, in order."""
    outcomes: list[Outcome | None] = [None] * len(tasks)
    ready: list[tuple[int, TaskInput]] = []
    for i, task in enumerate(tasks):
        if isinstance(task, TFBrokerError):
            outcomes[i] = task
            continue
        try:
            ready.append((i, _cast_inputs(signature, task)))
        except TFBrokerError as exc:
            outcomes[i] = exc
    groups: dict[Any, list[tuple[int, TaskInput]]] = {}
    for i, task in ready:
        groups.setdefault(_shape_key(task, i), []).append((i, task))
    for group in groups.values():
        pad_to = padded_rows if len(group) == len(tasks) else 0
        for (i, _), outcome in zip(group, _run_group(signature, [t for _, t in group], pad_to)):
            outcomes[i] = outcome
    return [o if o is not None else Internal("task was not run") for o in outcomes]


def run_joined(signature: Signature, batch: JoinedBatch, padded_rows: int) -> dict[str, np.ndarray] | list[Outcome]:
    """The outputs for the whole batch, unpadded, when it runs as one and every output can
    be cut by rows; otherwise one outcome per task (the tasks run alone to find the one at
    fault, or the outputs are cut here)."""
    total = sum(batch.rows)
    try:
        inputs = _cast_inputs(signature, TaskInput(-1, batch.inputs, total)).inputs
    except TFBrokerError as exc:
        return [exc] * len(batch.ids)
    run_rows = max(total, padded_rows)
    if run_rows > total:  # pad by repeating the first row: valid for any dtype
        inputs = {n: np.concatenate([a, np.repeat(a[:1], run_rows - total, axis=0)]) for n, a in inputs.items()}
    try:
        outputs = signature.run(inputs)
    except InvalidArgument:
        return _run_alone(signature, batch.split())  # one call per task finds the one at fault
    except Exception as exc:  # noqa: BLE001 - every task of a failed batch gets an error
        log.exception("batch of %d rows failed on signature %s", run_rows, signature.name)
        return [Internal(f"model failed: {type(exc).__name__}: {exc}")] * len(batch.ids)
    if any(np.ndim(v) == 0 or np.shape(v)[0] != run_rows for v in outputs.values()):
        return _run_alone(signature, batch.split())  # an output without the batch dimension
    outputs = {n: np.asarray(v)[:total] for n, v in outputs.items()}
    if any(v.dtype.kind in "OSU" for v in outputs.values()):  # strings travel per task
        return cut_rows(outputs, batch.rows)  # type: ignore[return-value]
    return outputs


# --- implementation ---

def _cast_inputs(signature: Signature, task: TaskInput) -> TaskInput:
    if set(task.inputs) == {""} and len(signature.inputs) == 1:  # the only input, unnamed
        task.inputs = {next(iter(signature.inputs)): task.inputs[""]}
    expected, given = set(signature.inputs), set(task.inputs)
    if expected != given:
        raise InvalidArgument(
            f"signature {signature.name!r} takes inputs {sorted(expected)}, got {sorted(given)}")
    cast = {}
    for name, array in task.inputs.items():
        dtype = signature.inputs[name].dtype
        if dtype == protocol.STRING:
            cast[name] = array
        else:
            cast[name] = array if array.dtype.name == dtype else array.astype(dtype)
    return TaskInput(task.request_id, cast, task.rows)


def _shape_key(task: TaskInput, index: int) -> Any:
    """Tasks whose inputs have the same inner shapes can share one model call."""
    arrays = task.inputs.values()
    if any(a.ndim == 0 for a in arrays) or len({a.shape[0] for a in arrays}) != 1:
        return ("alone", index)
    return tuple((name, a.shape[1:]) for name, a in sorted(task.inputs.items()))


def _run_group(signature: Signature, tasks: list[TaskInput], pad_to: int) -> list[Outcome]:
    rows = [t.rows for t in tasks]
    if len(tasks) == 1 and pad_to <= rows[0]:
        return [_run_one(signature, tasks[0])]
    batch = JoinedBatch([t.request_id for t in tasks], rows,
                        {name: np.concatenate([t.inputs[name] for t in tasks]) for name in tasks[0].inputs})
    result = run_joined(signature, batch, pad_to)
    return cut_rows(result, rows) if isinstance(result, dict) else result


def _run_alone(signature: Signature, tasks: list[TaskInput]) -> list[Outcome]:
    outcomes: list[Outcome] = []
    for task in tasks:
        try:
            outcomes.append(_run_one(signature, _cast_inputs(signature, task)))
        except TFBrokerError as exc:
            outcomes.append(exc)
    return outcomes


def _run_one(signature: Signature, task: TaskInput) -> Outcome:
    try:
        return {n: np.asarray(v) for n, v in signature.run(task.inputs).items()}
    except TFBrokerError as exc:
        return exc
    except Exception as exc:  # noqa: BLE001
        log.exception("request failed on signature %s", signature.name)
        return Internal(f"model failed: {type(exc).__name__}: {exc}")
