"""When tracing is on, and what crosses the processes (tfbroker/runtime/tracing.py)."""

from __future__ import annotations

import time

import pytest

from tfbroker.runtime import tracing
from tfbroker.wire import protocol
from tfbroker.wire.errors import ProtocolError

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.mark.parametrize(("environ", "on"), [
    ({}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
    ({"OTEL_TRACES_EXPORTER": "console"}, True),
    ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, False),
    ({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, False),
])
def test_tracing_is_off_unless_the_standard_variables_ask(environ: dict[str, str], on: bool) -> None:
    assert tracing.enabled(environ) is on
    tracer = tracing.start("broker", environ)
    assert (tracer is None) is not on
    if tracer is not None:
        tracer.shutdown()


def test_the_brokers_flags_become_the_variables_its_children_read() -> None:
    environ: dict[str, str] = {}
    tracing.configure(environ, "http://collector:4318/v1/traces", 0.01)
    assert environ == {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces",
                       "OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.01"}
    untouched = {"OTEL_TRACES_SAMPLER": "always_on"}
    tracing.configure(untouched, "", None)
    assert untouched == {"OTEL_TRACES_SAMPLER": "always_on"}


def test_trace_headers_are_found_in_asgi_headers_and_grpc_metadata() -> None:
    # (Both spell header names in lower case: ASGI by its specification, gRPC by HTTP/2.)
    assert tracing.trace_headers([(b"content-type", b"application/json"), (b"traceparent", TRACEPARENT.encode())]) \
        == {"traceparent": TRACEPARENT}
    assert tracing.trace_headers([("traceparent", TRACEPARENT), ("tracestate", "k=v"), ("user-agent", "grpc")]) \
        == {"traceparent": TRACEPARENT, "tracestate": "k=v"}


def test_a_monotonic_moment_becomes_epoch_nanoseconds() -> None:
    assert abs(tracing.wall_ns(time.monotonic()) - time.time_ns()) < 50_000_000


def test_a_clock_read_that_was_preempted_is_taken_again(monkeypatch: pytest.MonkeyPatch) -> None:
    # The first read loses 5 ms between its monotonic reads (a busy host); the second does not.
    monotonic = iter([1_000_000_000, 1_005_000_000, 2_000_000_000, 2_000_001_000])
    wall = iter([7_000_000_000, 8_000_000_000])
    monkeypatch.setattr(time, "monotonic_ns", lambda: next(monotonic))
    monkeypatch.setattr(time, "time_ns", lambda: next(wall))
    assert tracing.wall_ns(3.0) == 8_000_000_000 - 2_000_000_500 + 3_000_000_000


def test_a_request_carries_a_w3c_traceparent_and_nothing_else() -> None:
    header = protocol.Request(id=1, model="m", timeout_ms=10, inputs=[], trace=TRACEPARENT)
    decoded = protocol.decode(protocol.encode(protocol.REQUEST, header, []), protocol.CLIENT_TO_BROKER)
    assert decoded.header.trace == TRACEPARENT
    untraced = protocol.encode(protocol.REQUEST, protocol.Request(id=1, model="m", timeout_ms=10, inputs=[]), [])
    assert b"trace" not in bytes(untraced[2]), "an untraced request carries no field for it"
    bad = protocol.Request(id=1, model="m", timeout_ms=10, inputs=[], trace="00-" + "x" * 32 + "-b7ad6b7169203331-01")
    with pytest.raises(ProtocolError):
        protocol.decode(protocol.encode(protocol.REQUEST, bad, []), protocol.CLIENT_TO_BROKER)


@pytest.mark.parametrize(("sampler", "argument", "rate"), [
    (None, None, 1.0), ("parentbased_traceidratio", "0.01", 0.01), ("parentbased_traceidratio", "2", 1.0),
    ("parentbased_always_off", None, 0.0), ("traceidratio", "0.5", None), ("always_on", None, None)])
def test_a_parent_based_samplers_root_share_is_decided_before_any_span_is_made(
        sampler: str | None, argument: str | None, rate: float | None) -> None:
    environ = {"OTEL_TRACES_EXPORTER": "console"}
    if sampler:
        environ["OTEL_TRACES_SAMPLER"] = sampler
    if argument:
        environ["OTEL_TRACES_SAMPLER_ARG"] = argument
    tracer = tracing.start("frontend:1", environ)
    assert tracer is not None
    try:
        assert tracer.root_rate == rate
        if rate is not None:
            share = sum(tracer.sample_root() for _ in range(20_000)) / 20_000
            assert abs(share - rate) < 0.01 + rate * 0.1
            # The SDK follows the parent: a span under a sampled traceparent is sampled, whatever the rate.
            span = tracer.span("child", TRACEPARENT, time.monotonic(), time.monotonic())
            assert span.get_span_context().trace_flags.sampled
    finally:
        tracer.shutdown()
