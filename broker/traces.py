"""The broker's spans for traced requests (tfbroker/runtime/tracing.py): for each request
that came with a sampled ``trace``, its wait in the queue (admission to dispatch) and its
batch (dispatch to the result), whose traceparents go to the worker or I/O batcher with the
batch so that their spans are its children. Untraced requests cost one attribute read each.
"""

from __future__ import annotations

from typing import Any, Sequence

from broker.batching import Task
from tfbroker.runtime.tracing import Tracer

NO_SPANS: tuple[Any, ...] = ()


class BatchSpans:
    def __init__(self, tracer: Tracer, stage: str) -> None:
        self.tracer = tracer
        self.stage = stage  # "batch" (a model's) or "lookup batch" (an I/O batcher's)

    def open(self, tasks: Sequence[Task], now: float, attributes: dict[str, Any]) -> tuple[list[str], list[Any]]:
        """Each traced task's queue span (ended now) and batch span (open): the traceparents
        of the batch spans, to send with the batch, and the spans, to ``close`` at its result."""
        traces: list[str] = []
        spans: list[Any] = []
        tracer = self.tracer
        for task in tasks:
            parent = task.payload.trace
            if parent is None:
                continue
            tracer.span(f"tfbroker queue ({self.stage})", parent, task.payload.admitted, now, attributes=attributes)
            span = tracer.span(f"tfbroker {self.stage}", parent, now,
                               attributes={**attributes, "tfbroker.task_rows": task.size})
            traceparent = tracer.traceparent(span)
            if traceparent is not None:
                traces.append(traceparent)
                spans.append(span)
        return traces, spans

    def close(self, spans: Sequence[Any], now: float, *, error: str | None = None,
              attributes: dict[str, Any] | None = None) -> None:
        for span in spans:
            self.tracer.end(span, now, error=error, attributes=attributes)
