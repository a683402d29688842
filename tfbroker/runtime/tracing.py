"""OpenTelemetry traces across tfbroker's processes: off unless configured.

On when the standard variables ask for it (``enabled``): an OTLP endpoint
(``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_ENDPOINT``), or
``OTEL_TRACES_EXPORTER`` set to ``otlp`` or ``console``; never with ``OTEL_SDK_DISABLED=true``.
The broker's ``--otel_traces_endpoint`` and ``--otel_traces_sampling_rate`` set those variables
for itself and every process it starts. The sampler is the standard one (``OTEL_TRACES_SAMPLER``,
default: follow the caller, else sample all); only the frontend's root span samples, and a
request not sampled there carries no context onward, so it costs the other processes nothing.
For the parent-based samplers, a request without a caller's context is sampled here, before
any span object is made (``sample_root``): an unsampled request costs a frontend one random
number.

Each process starts its own SDK (``start(role)``): its spans leave through a
BatchSpanProcessor's thread, never on the request path, and are dropped when its queue is full
(``OTEL_BSP_MAX_QUEUE_SIZE``). The context crosses processes as a W3C ``traceparent`` inside
our messages (a REQUEST's ``trace``, a BATCH's ``traces``). Spans are made after the fact
from the moments each process already notes (monotonic seconds, converted here), so a traced
request is timed by the same clocks as the stage latencies.

With tracing off, ``start`` returns None, nothing imports OpenTelemetry, and each caller's
only cost is its check for None.
"""

from __future__ import annotations

import logging
import os
import random
import time
from typing import Any, Iterable, Mapping

ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
EXPORTERS = ("otlp", "console")
INSTALL_HINT = "pip install 'tfbroker[tracing]'"
TRACEPARENT = "traceparent"


def enabled(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the OTEL_* variables ask for traces."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter:
        return exporter in EXPORTERS
    return any(environ.get(name) for name in ENDPOINT_VARIABLES)


def configure(environ: dict[str, str] | Any, endpoint: str | None, sampling_rate: float | None) -> None:
    """The broker's flags, as the standard variables its children inherit."""
    if endpoint:
        environ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] = endpoint
    if sampling_rate is not None:
        environ["OTEL_TRACES_SAMPLER"] = "parentbased_traceidratio"
        environ["OTEL_TRACES_SAMPLER_ARG"] = repr(float(sampling_rate))


class Tracer:
    """One process's tracer: spans from monotonic moments, parented on W3C traceparents."""

    def __init__(self, role: str, environ: Mapping[str, str] = os.environ) -> None:
        try:
            from opentelemetry import trace
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
            from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
        except ImportError as exc:
            raise RuntimeError(f"tracing is configured (OTEL_* variables) but OpenTelemetry's SDK is not "
                               f"installed: {INSTALL_HINT}") from exc
        attributes: dict[str, Any] = {"service.name": environ.get("OTEL_SERVICE_NAME") or f"tfbroker-{role.partition(':')[0]}",
                      "tfbroker.role": role, "process.pid": os.getpid()}
        # The parent-based samplers' root decision is taken in sample_root; the SDK then follows
        # the parent. Any other sampler stays the SDK's own, read from the environment.
        self.root_rate = _root_rate(environ)
        sampler = None
        if self.root_rate is not None:
            from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased
            sampler = ParentBased(ALWAYS_ON)
        self.provider = TracerProvider(resource=Resource.create(attributes), sampler=sampler)
        self.provider.add_span_processor(BatchSpanProcessor(_exporter(environ)))
        self.tracer = self.provider.get_tracer("tfbroker")
        self._trace = trace
        self._propagator = TraceContextTextMapPropagator()

    def sample_root(self) -> bool:
        """Whether a request that brought no trace context starts a sampled trace."""
        rate = self.root_rate
        return rate is None or rate >= 1.0 or (rate > 0.0 and random.random() < rate)

    def span(self, name: str, parent: Any, start_s: float, end_s: float | None = None, *,
             attributes: Mapping[str, Any] | None = None, server: bool = False) -> Any:
        """A span from monotonic ``start_s``, ended at ``end_s`` if given. ``parent``: a
        traceparent string, a Context (``extract``), or None for a root."""
        context = self.extract({TRACEPARENT: parent}) if isinstance(parent, str) else parent
        kind = self._trace.SpanKind.SERVER if server else self._trace.SpanKind.INTERNAL
        span = self.tracer.start_span(name, context=context, kind=kind, attributes=attributes,
                                      start_time=wall_ns(start_s))
        if end_s is not None:
            span.end(end_time=wall_ns(end_s))
        return span

    def end(self, span: Any, end_s: float, *, error: str | None = None, attributes: Mapping[str, Any] | None = None
            ) -> None:
        if attributes:
            span.set_attributes(attributes)
        if error is not None:
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, error))
        span.end(end_time=wall_ns(end_s))

    def traceparent(self, span: Any) -> str | None:
        """The W3C traceparent that continues ``span`` in another process; None when it is not sampled."""
        if not span.get_span_context().trace_flags.sampled:
            return None
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier, context=self._trace.set_span_in_context(span))
        return carrier.get(TRACEPARENT)

    def extract(self, carrier: Mapping[str, str]) -> Any:
        """The caller's context from its ``traceparent`` (and ``tracestate``) headers."""
        return self._propagator.extract(carrier)

    def shutdown(self) -> None:
        """Export what is queued (at most a few seconds), then stop the exporter's thread."""
        self.provider.shutdown()


def start(role: str, environ: Mapping[str, str] = os.environ) -> Tracer | None:
    """This process's tracer, or None when tracing is not configured. RuntimeError when it is
    but cannot be (the SDK not installed, an exporter not known): the broker refuses to start."""
    return Tracer(role, environ) if enabled(environ) else None


def start_in_child(role: str) -> Tracer | None:
    """A child's tracer (frontend, worker, I/O batcher): one that cannot start is logged, and
    the process serves without it rather than failing in a restart loop."""
    try:
        return start(role)
    except RuntimeError as exc:
        logging.getLogger("tfbroker").error("tracing is off in this process: %s", exc)
        return None


def wall_ns(monotonic_s: float) -> int:
    """A monotonic moment as OpenTelemetry's time: nanoseconds since the epoch."""
    return _wall_offset_ns() + int(monotonic_s * 1e9)


def _wall_offset_ns() -> int:
    """The epoch clock less the monotonic one, read now (so a step of the system clock is
    followed) between two monotonic reads: a read that was preempted is taken again, else the
    spans of processes on a busy host would stray from each other by the time it lost."""
    best_gap, offset = None, 0
    for _ in range(3):
        before = time.monotonic_ns()
        wall = time.time_ns()
        after = time.monotonic_ns()
        if best_gap is None or after - before < best_gap:
            best_gap, offset = after - before, wall - (before + after) // 2
        if best_gap < 20_000:
            break
    return offset


def trace_headers(pairs: Iterable[tuple[Any, Any]]) -> dict[str, str]:
    """The W3C trace headers among ASGI headers (bytes) or gRPC metadata (str); both spell
    their names in lower case."""
    found = {}
    for key, value in pairs:
        if key in _TRACE_HEADER_NAMES:
            name = key.decode() if isinstance(key, bytes) else key
            found[name] = value.decode("latin-1") if isinstance(value, bytes) else str(value)
    return found


_TRACE_HEADER_NAMES = frozenset({b"traceparent", b"tracestate", "traceparent", "tracestate"})
_ROOT_RATES = {"parentbased_always_on": 1.0, "parentbased_always_off": 0.0}


def _root_rate(environ: Mapping[str, str]) -> float | None:
    """The share of requests without a caller's context that a parent-based sampler traces;
    None for another sampler."""
    name = environ.get("OTEL_TRACES_SAMPLER", "parentbased_always_on").strip().lower()
    if name == "parentbased_traceidratio":
        try:
            return min(1.0, max(0.0, float(environ.get("OTEL_TRACES_SAMPLER_ARG", "1.0"))))
        except ValueError:
            return 1.0  # the SDK's rule for an argument that does not parse
    return _ROOT_RATES.get(name)


def _exporter(environ: Mapping[str, str]) -> Any:
    if environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter
        return ConsoleSpanExporter()
    protocol = (environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or "http/protobuf")
    if protocol == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        except ImportError as exc:
            raise RuntimeError("OTLP over gRPC needs opentelemetry-exporter-otlp-proto-grpc; or set "
                               "OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf") from exc
        return OTLPSpanExporter()
    if protocol != "http/protobuf":
        raise RuntimeError(f"OTLP protocol {protocol!r}: tfbroker exports http/protobuf or grpc")
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter
    return HttpExporter()
