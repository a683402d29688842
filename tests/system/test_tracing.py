"""OpenTelemetry traces across the processes: the real SDK in every tfbroker process exports
over OTLP/HTTP to a receiver in this test, which parses what arrives with opentelemetry-proto."""

from __future__ import annotations

import secrets
import subprocess
import sys
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import grpc
import pytest

from tests.conftest import ROOT, serving, wait_for

trace_service = pytest.importorskip("opentelemetry.proto.collector.trace.v1.trace_service_pb2",
                                    reason="opentelemetry-proto (tfbroker[tracing]) is not installed")
pytest.importorskip("opentelemetry.sdk", reason="opentelemetry-sdk (tfbroker[tracing]) is not installed")

TEXT_INSTANCE = {"words": ["the", "cat", "sat", "oov-word"], "user": "nobody"}


@dataclass(frozen=True)
class Span:
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    role: str  # the exporting process's tfbroker.role, or its service name
    pid: int
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]


class Receiver:
    """An OTLP/HTTP trace receiver (POST /v1/traces, protobuf) on a free loopback port."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["content-length"]))
                request = trace_service.ExportTraceServiceRequest.FromString(body)
                receiver.add(request)
                answer = trace_service.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def add(self, request: Any) -> None:
        for resource_spans in request.resource_spans:
            resource = {kv.key: _value(kv.value) for kv in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    with self.lock:
                        self.spans.append(Span(
                            span.name, span.trace_id.hex(), span.span_id.hex(), span.parent_span_id.hex(),
                            str(resource.get("tfbroker.role") or resource.get("service.name")),
                            int(resource.get("process.pid", 0)), span.start_time_unix_nano, span.end_time_unix_nano,
                            {kv.key: _value(kv.value) for kv in span.attributes}))

    def trace(self, trace_id: str) -> list[Span]:
        with self.lock:
            return [s for s in self.spans if s.trace_id == trace_id]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


@pytest.fixture(scope="module")
def traced(test_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Receiver]]:
    """A broker whose every process exports its spans to the receiver (the text model: lookups
    in an I/O batcher, then the model), within 0.1 s of making them."""
    receiver = Receiver()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
        with serving(tmp_path_factory.mktemp("tracing"), {"text": test_models / "text"},
                     [f"--otel_traces_endpoint={receiver.endpoint}"], frontends=1) as broker:
            yield broker, receiver
    receiver.close()


def by_name(spans: list[Span]) -> dict[str, Span]:
    return {s.name: s for s in spans}


EXPECTED = {"tfbroker predict", "tfbroker queue (lookup batch)", "tfbroker lookup batch", "tfbroker lookups",
            "tfbroker queue (batch)", "tfbroker batch", "tfbroker model"}


def test_one_request_is_one_trace_parented_across_four_processes(traced: tuple[Any, Receiver]) -> None:
    broker, receiver = traced
    trace_id, caller = secrets.token_hex(16), secrets.token_hex(8)
    response = broker.http.post("/v1/models/text:predict", json={"instances": [TEXT_INSTANCE]},
                                headers={"traceparent": f"00-{trace_id}-{caller}-01"})
    assert response.status_code == 200, response.text
    spans = wait_for(lambda: (found := receiver.trace(trace_id)) and {s.name for s in found} >= EXPECTED and found,
                     30, "the request's spans from every process")
    named = by_name(spans)
    assert len(spans) == len(EXPECTED), sorted(s.name for s in spans)
    server = named["tfbroker predict"]
    assert server.parent_id == caller, "the frontend's span continues the caller's traceparent"
    assert server.role.startswith("frontend:") and server.attributes["model.name"] == "text"
    assert server.attributes["http.response.status_code"] == 200
    for name in ("tfbroker queue (lookup batch)", "tfbroker lookup batch", "tfbroker queue (batch)", "tfbroker batch"):
        assert named[name].parent_id == server.span_id and named[name].role == "broker", name
    assert named["tfbroker lookups"].parent_id == named["tfbroker lookup batch"].span_id
    assert named["tfbroker lookups"].role.startswith("iobatcher:")
    model = named["tfbroker model"]
    assert model.parent_id == named["tfbroker batch"].span_id and model.role.startswith("worker:text:")
    assert model.attributes["model.version"] == 2 and model.attributes["tfbroker.model_ran"] is True
    assert len({s.pid for s in spans}) == 4, "frontend, broker, I/O batcher and worker each export their own"
    # Each child lies within its parent (the clocks are the host's).
    for child, parent in (("tfbroker batch", "tfbroker predict"), ("tfbroker model", "tfbroker batch"),
                          ("tfbroker lookups", "tfbroker lookup batch")):
        assert named[parent].start_ns <= named[child].start_ns <= named[child].end_ns <= named[parent].end_ns, child
    batch = named["tfbroker batch"]
    assert batch.attributes["model.version"] == 2 and batch.attributes["tfbroker.batch_rows"] >= 1
    assert batch.attributes["tfbroker.batch_exit"] in ("full", "timeout", "idle")


def test_a_grpc_call_continues_the_traceparent_in_its_metadata(traced: tuple[Any, Receiver]) -> None:
    from frontend import grpc_messages as pb

    broker, receiver = traced
    request = pb.PredictRequest()
    request.model_spec.name = "text"
    for name, values in (("words", [TEXT_INSTANCE["words"]]), ("user", [TEXT_INSTANCE["user"]])):
        tensor = request.inputs[name]
        tensor.dtype = pb.DATA_TYPES["DT_STRING"]
        flat = [w.encode() for row in values for w in (row if isinstance(row, list) else [row])]
        for size in ([1, len(values[0])] if name == "words" else [1]):
            tensor.tensor_shape.dim.add(size=size)
        tensor.string_val.extend(flat)
    trace_id, caller = secrets.token_hex(16), secrets.token_hex(8)
    with grpc.insecure_channel(f"127.0.0.1:{broker.grpc_port}") as channel:
        call = channel.unary_unary("/tensorflow.serving.PredictionService/Predict",
                                   request_serializer=pb.PredictRequest.SerializeToString,
                                   response_deserializer=pb.PredictResponse.FromString)
        call(request, timeout=30, metadata=[("traceparent", f"00-{trace_id}-{caller}-01")])
    spans = wait_for(lambda: (found := receiver.trace(trace_id)) and {s.name for s in found} >= EXPECTED and found,
                     30, "the gRPC call's spans")
    named = by_name(spans)
    assert named["tfbroker predict"].parent_id == caller
    assert named["tfbroker predict"].attributes["tfbroker.api"] == "GRPC"
    assert named["tfbroker model"].parent_id == named["tfbroker batch"].span_id


def test_a_caller_that_does_not_sample_costs_no_span_anywhere(traced: tuple[Any, Receiver]) -> None:
    broker, receiver = traced
    unsampled = secrets.token_hex(16)
    assert broker.http.post("/v1/models/text:predict", json={"instances": [TEXT_INSTANCE]},
                            headers={"traceparent": f"00-{unsampled}-{secrets.token_hex(8)}-00"}).status_code == 200
    # A sampled request sent after it: once its spans are in from every process, so would the
    # first request's be (each process exports its spans in order).
    sampled = secrets.token_hex(16)
    assert broker.http.post("/v1/models/text:predict", json={"instances": [TEXT_INSTANCE]},
                            headers={"traceparent": f"00-{sampled}-{secrets.token_hex(8)}-01"}).status_code == 200
    wait_for(lambda: {s.name for s in receiver.trace(sampled)} >= EXPECTED, 30, "the sampled request's spans")
    assert receiver.trace(unsampled) == []


CLIENT_APP = """
import sys
import numpy as np
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from tfbroker import Client

provider = TracerProvider(resource=Resource.create({"service.name": "users-app"}))
provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=sys.argv[2])))
trace.set_tracer_provider(provider)
with trace.get_tracer("app").start_as_current_span("GET /recommend") as span:
    answer = Client(sys.argv[1]).predict("text", {"words": np.array([["the", "cat", "sat", "mat"]]),
                                                  "user": np.array(["nobody"])})
    print(format(span.get_span_context().trace_id, "032x"), answer.version)
provider.shutdown()
"""


def test_the_python_client_continues_the_callers_trace(traced: tuple[Any, Receiver]) -> None:
    """An app instrumented with OpenTelemetry sees the model's time inside its own request."""
    broker, receiver = traced
    result = subprocess.run([sys.executable, "-c", CLIENT_APP, broker.address, receiver.endpoint], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    trace_id, version = result.stdout.split()
    assert version == "2"
    spans = wait_for(lambda: (found := receiver.trace(trace_id)) and {s.name for s in found} >= EXPECTED | {"GET /recommend"}
                     and found, 30, "the app's trace to hold the model's spans")
    named = by_name(spans)
    app, client = named["GET /recommend"], named["tfbroker predict"]
    assert app.role == "users-app" and client.role == "users-app" and client.parent_id == app.span_id
    assert named["tfbroker batch"].parent_id == client.span_id, "the broker's spans are the client span's children"
    assert named["tfbroker model"].parent_id == named["tfbroker batch"].span_id
    assert app.start_ns <= named["tfbroker model"].start_ns <= named["tfbroker model"].end_ns <= app.end_ns


def test_a_request_without_a_traceparent_starts_a_trace_of_its_own(traced: tuple[Any, Receiver]) -> None:
    broker, receiver = traced

    def roots() -> set[str]:
        with receiver.lock:
            return {s.trace_id for s in receiver.spans if s.name == "tfbroker predict" and not s.parent_id}

    before = roots()
    assert broker.http.post("/v1/models/text:predict", json={"instances": [TEXT_INSTANCE]}).status_code == 200
    new = wait_for(lambda: roots() - before, 30, "a new root span")
    (trace_id,) = new
    wait_for(lambda: {s.name for s in receiver.trace(trace_id)} >= EXPECTED, 30, "the new trace's spans")
