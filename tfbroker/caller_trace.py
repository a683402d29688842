"""The caller's OpenTelemetry trace, continued by the public clients (``tfbroker.Client``,
``AsyncClient``): each model call gets a CLIENT span, a child of the app's current span, and
its W3C traceparent travels in the REQUEST, so the broker's and the worker's spans land in the
app's own trace. It needs only opentelemetry-api and an app that configured an SDK (Flask or
FastAPI instrumented with OpenTelemetry); without either, a call costs one check.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

_api: list[Any] = []  # [opentelemetry.trace module, tracer, propagator] once looked for; [None] when absent


def _otel() -> Any:
    if not _api:
        try:
            from opentelemetry import trace
            from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
        except ImportError:
            _api.append(None)
        else:
            _api.extend([trace, trace.get_tracer("tfbroker.client"), TraceContextTextMapPropagator()])
    return _api[0]


def available() -> bool:
    return _otel() is not None


@contextmanager
def caller_span(method: str, model: str) -> Iterator[str | None]:
    """A CLIENT span around one model call; yields the traceparent to send, or None when the
    caller has no sampled trace (then nothing is recorded)."""
    trace = _otel()
    if trace is None:
        yield None
        return
    _, tracer, propagator = _api
    span = tracer.start_span(f"tfbroker {method}", kind=trace.SpanKind.CLIENT,
                             attributes={"model.name": model, "rpc.system": "tfbroker"})
    context = span.get_span_context()
    if not (context.is_valid and context.trace_flags.sampled):
        span.end()
        yield None
        return
    carrier: dict[str, str] = {}
    propagator.inject(carrier, context=trace.set_span_in_context(span))
    try:
        yield carrier.get("traceparent")
    except BaseException as exc:
        span.set_status(trace.Status(trace.StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        raise
    finally:
        span.end()
