"""Running one BATCH: concatenate the tasks' inputs, pad, run, split, one answer per task.

Every task gets exactly its own rows back, or its own error. A batch that fails with an
InvalidArgument error is run again task by task, so one bad request fails alone.

A joined BATCH (see tfbroker/wire/protocol.py) arrives already concatenated, one tensor per
input; ``run_joined`` answers it with one tensor per output when it can, so the worker's
Python work is per batch, not per task.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from tfbroker.wire import fields, protocol, tensors
from tfbroker.wire.errors import DeadlineExceeded, Internal, InvalidArgument, ProtocolError, TFBrokerError
from tfbroker.wire.tensors import TF_NAMES
from workers.model import Signature

log = logging.getLogger(__name__)


@dataclass(slots=True)
class TaskInput:
    """One task's inputs, or, when it cannot run (malformed, out of time), its ``error``."""

    request_id: int
    inputs: dict[str, np.ndarray]
    rows: int
    error: TFBrokerError | None = None
    examples: bool = False  # serialized tf.Examples for a classify or regress signature: fed as they are


Outcome = dict[str, np.ndarray] | TFBrokerError


@dataclass(slots=True)
class JoinedInputs:
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


def decode_batch(frames: Sequence[Any], counts: Sequence[int], deadlines: Sequence[float],
                 now: float) -> list[TaskInput]:
    """Split a BATCH's payload into its tasks (request header, then tensors, per task); a task
    that does not decode, or whose deadline has passed, carries its error instead."""
    tasks: list[TaskInput] = []
    offset = 0
    for count, deadline in zip(counts, deadlines):
        parts = frames[offset:offset + count]
        offset += count
        request_id = protocol.header_id(parts[0]) or 0
        try:
            header = protocol.decode_header(protocol.REQUEST, parts[0])
            arrays = tensors.decode_tensors(header.inputs, parts[1:])
        except ProtocolError as exc:
            tasks.append(TaskInput(request_id, {}, 0, InvalidArgument(f"protocol error: {exc}")))
            continue
        if now > deadline:
            tasks.append(TaskInput(request_id, {}, 0, DeadlineExceeded()))
            continue
        tasks.append(TaskInput(request_id, arrays, _rows(arrays), examples=header.method != "predict"))
    return tasks


def split_expired(ids: list[int], rows: list[int], inputs: dict[str, np.ndarray], deadlines: Sequence[float],
                  now: float) -> tuple[JoinedInputs, set[int]]:
    """The joined batch without the tasks whose deadline has passed, and those tasks' indices."""
    expired = {i for i, deadline in enumerate(deadlines) if now > deadline}
    if not expired:
        return JoinedInputs(ids, rows, inputs), expired
    keep = [i for i in range(len(ids)) if i not in expired]
    starts = np.cumsum([0, *rows])
    index = np.concatenate([np.arange(starts[i], starts[i + 1]) for i in keep]) if keep else np.zeros(0, np.int64)
    return JoinedInputs([ids[i] for i in keep], [rows[i] for i in keep],
                       {name: array[index] for name, array in inputs.items()}), expired


def encode_outcome(request_id: int, model: str, version: int, outcome: Outcome) -> list[Any]:
    """The client message for one task: REPLY with its tensors, or ERROR."""
    if isinstance(outcome, TFBrokerError):
        error = protocol.Error(id=request_id, code=outcome.http_status,
                               message=outcome.message[:fields.MAX_MESSAGE_CHARS])
        return [protocol.ERROR, protocol.encode_header(error)]
    try:
        specs, frames = tensors.encode_tensors(outcome)
        reply = protocol.PredictReply(id=request_id, model=model, version=version, outputs=specs)
    except (ValueError, TypeError) as exc:  # an output no client could read (a dtype we do not carry)
        return encode_outcome(request_id, model, version, Internal(f"cannot encode the model's outputs: {exc}"))
    return [protocol.REPLY, protocol.encode_header(reply), *frames]


def run_batch(signature: Signature, tasks: Sequence[TaskInput], padded_rows: int) -> list[Outcome]:
    """One outcome per task, in order."""
    outcomes: list[Outcome | None] = [None] * len(tasks)
    ready: list[tuple[int, TaskInput]] = []
    for i, task in enumerate(tasks):
        if task.error is not None:
            outcomes[i] = task.error
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


def run_joined_outcomes(signature: Signature, batch: JoinedInputs, padded_rows: int) -> list[Outcome]:
    """run_joined, always as one outcome per task."""
    result = run_joined(signature, batch, padded_rows)
    return cut_rows(result, batch.rows) if isinstance(result, dict) else result  # type: ignore[return-value]


def run_joined(signature: Signature, batch: JoinedInputs, padded_rows: int) -> dict[str, np.ndarray] | list[Outcome]:
    """The outputs for the whole batch, unpadded, when it runs as one and every output can
    be cut by rows; otherwise one outcome per task (the tasks run alone to find the one at
    fault, or the outputs are cut here)."""
    total = sum(batch.rows)
    try:
        inputs = _cast_inputs(signature, TaskInput(-1, batch.inputs, total)).inputs
    except TFBrokerError as exc:
        # A value one task sent that does not fit (TF Serving's rules) fails that task alone.
        return _run_alone(signature, batch.split()) if len(batch.ids) > 1 else [exc]
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
        if dtype == protocol.STRING or array.dtype.name == dtype or task.examples:
            cast[name] = array
        else:
            _check_values_fit(array, dtype)
            with np.errstate(over="ignore"):  # beyond a float's range: ±inf, as C++'s conversion
                cast[name] = array.astype(dtype)
    return TaskInput(task.request_id, cast, task.rows, examples=task.examples)  # (only runnable tasks get here)


def _check_values_fit(array: np.ndarray, dtype: str) -> None:
    """TF Serving's rules for values of another dtype: an integer must fit an integer type.
    Any number feeds a float type, converted as C++ converts it (TF Serving since 2021, its
    api_rest.md "Floating Point Precision"): 1435774380 becomes the nearest float32,
    1435774336; beyond the float's range, ±inf; below it, 0. InvalidArgument otherwise."""
    if not array.size:
        return
    target = np.dtype(dtype)
    if array.dtype.kind in "iu" and target.kind in "iu":
        info = np.iinfo(target)
        low, high = array.min(), array.max()
        if low < info.min or high > info.max:
            bad = low if low < info.min else high
            raise InvalidArgument(f"JSON Value: {bad} Type: Number is not of expected type: {TF_NAMES[dtype]}")


def _rows(tensors: dict[str, np.ndarray]) -> int:
    """The task's common batch dimension, or 0 when it has none (scalars, unequal first
    dimensions): such a task runs alone."""
    firsts = {a.shape[0] if a.ndim else -1 for a in tensors.values()}
    return firsts.pop() if len(firsts) == 1 and -1 not in firsts else 0


def _shape_key(task: TaskInput, index: int) -> Any:
    """Tasks whose inputs have the same inner shapes can share one model call. Examples run
    alone: their signature's declared input dtype may not be the one fed (TF1 exports)."""
    if not task.rows or task.examples:
        return ("alone", index)
    return tuple((name, a.shape[1:]) for name, a in sorted(task.inputs.items()))


def _run_group(signature: Signature, tasks: list[TaskInput], pad_to: int) -> list[Outcome]:
    rows = [t.rows for t in tasks]
    if len(tasks) == 1 and (not rows[0] or pad_to <= rows[0]):  # (a task without rows is never padded)
        return [_run_one(signature, tasks[0])]
    batch = JoinedInputs([t.request_id for t in tasks], rows,
                        {name: np.concatenate([t.inputs[name] for t in tasks]) for name in tasks[0].inputs})
    return run_joined_outcomes(signature, batch, pad_to)


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
