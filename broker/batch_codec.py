"""What travels between the broker and a worker for one batch: the BATCH it sends, and the
replies it cuts from the RESULT; and a request larger than a batch, cut into parts and its
replies joined. Pure functions over frames; the broker never decodes a numeric tensor.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import msgspec
import numpy as np

from tfbroker.wire import protocol, tensors
from broker.batching import Task
from tfbroker.wire.errors import ProtocolError


def build_batch(batch_id: int, signature: str, padded_rows: int, tasks: Sequence[Task],
                now: float) -> tuple[protocol.Header, list[Any]]:
    """The BATCH header and payload for ``tasks``: joined (one frame per input for the whole
    batch, so the worker decodes, runs and encodes once per batch) when every task has the
    same numeric inputs, else each task's own header and frames."""
    # Time left for each task, rounded up: a task due in 0.3 ms still has time.
    timeouts = [max(1, math.ceil((t.deadline - now) * 1000)) for t in tasks]
    join_key = tasks[0].payload.join_key
    if join_key is not None and all(t.payload.join_key == join_key for t in tasks):
        rows = sum(t.size for t in tasks)
        frames: list[Any] = []
        for i in range(1, len(join_key) + 1):
            parts = [t.payload.frames[i] for t in tasks]
            frames.append(parts[0] if len(parts) == 1 else b"".join(parts))
        header: protocol.Header = protocol.JoinedBatch(
            batch=batch_id, signature=signature, padded_rows=padded_rows,
            ids=[t.payload.request_id for t in tasks], rows=[t.size for t in tasks], timeouts_ms=timeouts,
            inputs=[protocol.TensorSpec(name, dtype, (rows, *inner)) for name, dtype, inner in join_key])
        return header, frames
    frames = []
    counts = []
    for task in tasks:
        frames.extend(task.payload.frames)
        counts.append(len(task.payload.frames))
    return protocol.TaskBatch(batch=batch_id, signature=signature, padded_rows=padded_rows, counts=counts,
                              timeouts_ms=timeouts), frames


def split_task_result(result: protocol.TaskResult, frames: Sequence[Any], tasks: Sequence[Task]) -> list[list[Any]]:
    """Each task's client message (``[REPLY|ERROR, header, frames…]``) from a per-task RESULT;
    ValueError when it does not answer exactly these tasks."""
    if len(result.counts) != len(tasks):
        raise ValueError(f"{len(result.counts)} answers for {len(tasks)} tasks")
    messages, offset = [], 0
    for count in result.counts:
        message = list(frames[offset:offset + count])
        if count < 2 or bytes(message[0]) not in (protocol.REPLY, protocol.ERROR):
            raise ValueError("an answer is not a REPLY or an ERROR")
        messages.append(message)
        offset += count
    return messages


def by_client(tasks: list[Task]) -> list[Task]:
    """The tasks of a batch grouped by client (in order of first appearance), so each
    client's rows of the result are one run: answered with one RowsReply."""
    groups: dict[bytes, list[Task]] = {}
    for task in tasks:
        group = groups.get(task.payload.client)
        if group is None:
            groups[task.payload.client] = [task]
        else:
            group.append(task)
    return tasks if len(groups) == 1 else [task for group in groups.values() for task in group]


def cut_joined_result(result: protocol.JoinedResult, frames: Sequence[Any],
                      tasks: Sequence[Task]) -> list[tuple[list[Task], list[Any]]]:
    """The answers in a joined RESULT (one tensor per output, the tasks' rows in order):
    for each run of whole requests of one client, one RowsReply (a PredictReply when the run
    is one request), and one PredictReply for each part of a split request; each with the
    tasks it answers. ValueError when an output cannot be cut by these tasks' rows."""
    total = sum(t.size for t in tasks)
    outputs = []
    for spec, frame in zip(result.outputs, frames):
        view = memoryview(frame)
        if not spec.shape or spec.shape[0] != total or spec.dtype == protocol.STRING or len(view) != tensors.nbytes(spec):
            raise ValueError(f"output {spec.name!r} of shape {list(spec.shape)} for a batch of {total} rows")
        outputs.append((spec, view, len(view) // total if total else 0))
    answers: list[tuple[list[Task], list[Any]]] = []
    run: list[Task] = []
    start = run_start = 0
    for task in tasks:
        if not run or task.payload.client != run[0].payload.client or task.payload.split is not None:
            if run:
                answers.append((run, _rows_answer(result, outputs, run, run_start, start)))
            run, run_start = [], start
        run.append(task)
        start += task.size
        if task.payload.split is not None:  # a part is answered alone: its request joins the parts
            answers.append((run, _rows_answer(result, outputs, run, run_start, start)))
            run = []
    if run:
        answers.append((run, _rows_answer(result, outputs, run, run_start, start)))
    return answers


def _rows_answer(result: protocol.JoinedResult, outputs: list[tuple[protocol.TensorSpec, memoryview, int]],
                 tasks: list[Task], start: int, end: int) -> list[Any]:
    """The answer to ``tasks`` (rows ``start`` to ``end`` of the result): their outputs' rows, not copied."""
    rows = end - start
    specs = [protocol.TensorSpec(spec.name, spec.dtype, (rows, *spec.shape[1:])) for spec, _, _ in outputs]
    header: protocol.Header
    if len(tasks) == 1:
        header = protocol.PredictReply(id=tasks[0].payload.request_id, model=result.model, version=result.version,
                                       outputs=specs)
    else:
        header = protocol.RowsReply(ids=[t.payload.request_id for t in tasks], rows=[t.size for t in tasks],
                                    model=result.model, version=result.version, outputs=specs)
    return [protocol.REPLY, protocol.encode_header(header),
            *[view[start * row_bytes:end * row_bytes] for _, view, row_bytes in outputs]]


def describe_tasks(tasks: Iterable[Task], most: int = 8) -> str:
    """What the requests were, for the log of a worker that died holding them."""
    parts: list[str] = []
    for task in tasks:
        if len(parts) == most:
            parts.append("…")
            break
        try:
            request = protocol.decode_header(protocol.REQUEST, task.payload.frames[0])
        except ProtocolError:
            parts.append("(unreadable request)")
            continue
        inputs = ", ".join(f"{s.name or '(only)'} {s.dtype}{list(s.shape)}" for s in request.inputs)
        parts.append(f"id {request.id} {request.model}/{request.signature} [{inputs}]")
    return "; ".join(parts)


def split_frames(request: protocol.Request, frames: Sequence[Any], rows: int,
                 limit: int) -> list[tuple[int, list[Any]]]:
    """A request of ``rows`` rows (numeric inputs sharing the batch dimension) cut into parts
    of at most ``limit`` rows: each part's rows and frames (its own REQUEST header, then its
    slice of every input, not copied)."""
    parts = []
    for start in range(0, rows, limit):
        count = min(limit, rows - start)
        specs, sliced = [], []
        for spec, frame in zip(request.inputs, frames[1:]):
            row_bytes = len(frame) // rows
            sliced.append(memoryview(frame)[start * row_bytes:(start + count) * row_bytes])
            specs.append(protocol.TensorSpec(spec.name, spec.dtype, (count, *spec.shape[1:])))
        header = msgspec.structs.replace(request, inputs=specs)
        parts.append((count, [protocol.encode_header(header), *sliced]))
    return parts


def join_replies(replies: Sequence[list[Any]]) -> list[Any]:
    """One REPLY from the REPLYs of a request's parts, in order: every output joined along
    the batch dimension. ValueError when an output has no batch dimension to join along."""
    headers = [protocol.decode_header(protocol.REPLY, reply[1]) for reply in replies]
    first = headers[0]
    outputs, frames = [], []
    for index, spec in enumerate(first.outputs):
        parts = [(header.outputs[index], reply[2 + index]) for header, reply in zip(headers, replies)]
        if any(not p.shape or p.shape[1:] != spec.shape[1:] or p.name != spec.name for p, _ in parts):
            raise ValueError(f"output {spec.name!r} cannot be joined along a batch dimension")
        rows = sum(p.shape[0] for p, _ in parts)
        if spec.dtype == protocol.STRING:  # decoded on this path only: a split request's string output
            joined: Any = tensors.encode_tensors({spec.name: np.concatenate(
                [tensors.decode_tensors([p], [f])[p.name].reshape(-1) for p, f in parts])})[1][0]
        else:
            joined = b"".join(bytes(f) for _, f in parts)
        outputs.append(protocol.TensorSpec(spec.name, spec.dtype, (rows, *spec.shape[1:])))
        frames.append(joined)
    reply = msgspec.structs.replace(first, outputs=outputs)
    return [protocol.REPLY, protocol.encode_header(reply), *frames]
