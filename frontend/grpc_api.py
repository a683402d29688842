"""TF Serving's gRPC API: PredictionService and ModelService (and grpc.health.v1 when asked),
served by every frontend process beside HTTP, on the same event loop and the same broker
client, so one copy of each model, the same batching, deadlines, limits and version pinning.

The RPC's deadline is the request's deadline all the way to the worker (capped by
``--rest_api_timeout_in_ms``); a cancelled RPC cancels its queued request. Errors carry
the gRPC code of their class (InvalidArgument: INVALID_ARGUMENT, NotFound: NOT_FOUND,
Unavailable: UNAVAILABLE, DeadlineExceeded: DEADLINE_EXCEEDED, …) and the REST API's texts.
Messages come from frontend/grpc_messages.py (our own protos, a private descriptor pool).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Awaitable, Callable

import grpc
from google.protobuf import json_format, text_format

from frontend import grpc_messages as pb
from frontend.grpc_tensors import from_proto, to_proto
from frontend.metrics import Metrics
from frontend.tf_example import classifications, regressions
from tfbroker.async_client import AsyncClient
from tfbroker.client import Prediction
from tfbroker.runtime.settings import GrpcOptions, RequestLimits, channel_arguments
from tfbroker.wire.errors import DeadlineExceeded, Internal, InvalidArgument, TFBrokerError, Unavailable

log = logging.getLogger("tfbroker.grpc")

# Our errors' HTTP status -> gRPC status code.
CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND,
         413: grpc.StatusCode.RESOURCE_EXHAUSTED, 499: grpc.StatusCode.CANCELLED,
         500: grpc.StatusCode.INTERNAL, 501: grpc.StatusCode.UNIMPLEMENTED,
         503: grpc.StatusCode.UNAVAILABLE, 504: grpc.StatusCode.DEADLINE_EXCEEDED}
SIGNATURE_DEF_MAP_URL = "type.googleapis.com/tensorflow.serving.SignatureDefMap"
CLASSIFY_METHOD = "tensorflow/serving/classify"
REGRESS_METHOD = "tensorflow/serving/regress"
HEALTH_SERVICES = ("", "tensorflow.serving.ModelService", "tensorflow.serving.PredictionService")


class Services:
    """The RPCs. Each turns a request into broker calls and the answer into TF Serving's."""

    def __init__(self, client: AsyncClient, timeout_s: float, options: GrpcOptions, limits: RequestLimits,
                 metrics: Metrics | None = None) -> None:
        self.client = client
        self.timeout_s = timeout_s
        self.options = options
        self.limits = limits
        self.metrics = metrics
        self.waiting = 0

    # --- PredictionService ---

    async def predict(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        spec = request.model_spec
        inputs = {name: from_proto(name, tensor) for name, tensor in request.inputs.items()}
        result = await self._run(self.client.predict(spec.name, inputs, **_choice(spec), timeout_s=self._deadline(context),
                                                     exact_dtypes=True))
        outputs = result.outputs
        if request.output_filter:
            missing = [name for name in request.output_filter if name not in outputs]
            if missing:
                raise InvalidArgument(f"output tensor alias not found in signature: {missing[0]} Outputs expected "
                                      f"to be in the set {{{','.join(sorted(outputs))}}}.")
            outputs = {name: outputs[name] for name in request.output_filter}
        response = pb.PredictResponse()
        _answer_spec(response.model_spec, spec, result)
        for name, array in outputs.items():
            response.outputs[name].CopyFrom(to_proto(array, as_content=self.options.enable_serialization_as_tensor_content))
        return response

    async def classify(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        response = pb.ClassificationResponse()
        result, count = await self._examples("classify", request.model_spec, request.input, context)
        _answer_spec(response.model_spec, request.model_spec, result)
        _fill_classifications(response.result, result, count)
        return response

    async def regress(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        response = pb.RegressionResponse()
        result, count = await self._examples("regress", request.model_spec, request.input, context)
        _answer_spec(response.model_spec, request.model_spec, result)
        _fill_regressions(response.result, result, count)
        return response

    async def multi_inference(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """Each task on the same examples (TF Serving: one model, classify or regress)."""
        if not request.tasks:
            raise InvalidArgument("Expected at least one task")
        if len({task.model_spec.name for task in request.tasks}) > 1:
            raise InvalidArgument("All ModelSpecs in a MultiInferenceRequest must access the same model name.")
        signatures = [task.model_spec.signature_name for task in request.tasks]
        if len(set(signatures)) < len(signatures):
            raise InvalidArgument("Duplicate evaluation of signature: " + next(
                s for s in signatures if signatures.count(s) > 1))
        response = pb.MultiInferenceResponse()
        for task in request.tasks:
            if task.method_name not in (CLASSIFY_METHOD, REGRESS_METHOD):
                raise InvalidArgument(f"Unsupported signature method_name: {task.method_name}")
            verb = "classify" if task.method_name == CLASSIFY_METHOD else "regress"
            result, count = await self._examples(verb, task.model_spec, request.input, context)
            out = response.results.add()
            _answer_spec(out.model_spec, task.model_spec, result)
            if verb == "classify":
                _fill_classifications(out.classification_result, result, count)
            else:
                _fill_regressions(out.regression_result, result, count)
        return response

    async def get_model_metadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        spec = request.model_spec
        if not request.metadata_field:
            raise InvalidArgument("GetModelMetadataRequest must specify at least one metadata_field")
        for field in request.metadata_field:
            if field != "signature_def":
                raise InvalidArgument(f"Metadata field {field} is not supported")
        reply = await self._run(self.client.metadata(spec.name, **_version(spec)))
        signature_map = json_format.ParseDict(reply["signature_def"], pb.SignatureDefMap(),
                                              ignore_unknown_fields=True)
        response = pb.GetModelMetadataResponse()
        response.model_spec.name = spec.name
        response.model_spec.version.value = reply["version"]
        response.metadata["signature_def"].Pack(signature_map)
        return response

    # --- ModelService ---

    async def get_model_status(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        spec = request.model_spec
        status = await self._run(self.client.status(spec.name, **_version(spec)))
        return json_format.ParseDict({"model_version_status": status["model_version_status"]},
                                     pb.GetModelStatusResponse(), ignore_unknown_fields=True)

    async def handle_reload_config_request(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """The config replaces the served models (TF Serving's text format to the broker)."""
        if request.config.WhichOneof("config") != "model_config_list":
            raise InvalidArgument("ServerConfig type not supported: only model_config_list is")
        await self._run(self.client.reload_config(text_format.MessageToString(request.config)))
        response = pb.ReloadConfigResponse()
        response.status.error_code = 0  # OK
        return response

    # --- implementation ---

    async def _examples(self, verb: str, spec: Any, given: Any, context: grpc.aio.ServicerContext
                        ) -> tuple[Prediction, int]:
        examples = serialized_examples(given)
        run = self.client.classify if verb == "classify" else self.client.regress
        result = await self._run(run(spec.name, examples, **_choice(spec), timeout_s=self._deadline(context)))
        return result, len(examples)

    async def _run(self, call: Awaitable[Any]) -> Any:
        """A broker call within this frontend's capacity (max_concurrent_predictions)."""
        if self.waiting >= self.limits.max_concurrent_predictions:
            call.close()  # type: ignore[attr-defined]
            raise Unavailable(f"this frontend has {self.waiting} predictions waiting, its limit; retry later")
        self.waiting += 1
        try:
            return await call
        finally:
            self.waiting -= 1

    def _deadline(self, context: grpc.aio.ServicerContext) -> float:
        """The RPC's time left, at most the server's request deadline."""
        remaining = context.time_remaining()
        if remaining is None:
            return self.timeout_s
        if remaining <= 0:
            raise DeadlineExceeded()
        return min(self.timeout_s, remaining)


def serialized_examples(given: Any) -> list[bytes]:
    """The request's examples, serialized; with a context, the context's features in every
    example (an example's own win), as TF Serving's servables merge them."""
    kind = given.WhichOneof("kind")
    if kind == "example_list":
        examples = [example.SerializeToString() for example in given.example_list.examples]
    elif kind == "example_list_with_context":
        listed = given.example_list_with_context
        context = listed.context.SerializeToString()
        examples = [context + example.SerializeToString() for example in listed.examples]
    else:
        raise InvalidArgument("Input is empty")
    if not examples:
        raise InvalidArgument("Input is empty")
    return examples


def _version(spec: Any) -> dict[str, Any]:
    """The version a ModelSpec asks for: a number, a label, or neither (the latest)."""
    choice = spec.WhichOneof("version_choice")
    return {"version": spec.version.value if choice == "version" else None,
            "label": spec.version_label if choice == "version_label" else None}


def _choice(spec: Any) -> dict[str, Any]:
    """The version a ModelSpec asks for, and its signature."""
    return {**_version(spec), "signature_name": spec.signature_name or "serving_default"}


def _answer_spec(out: Any, asked: Any, result: Prediction) -> None:
    out.name = asked.name
    out.version.value = result.version
    out.signature_name = asked.signature_name or "serving_default"


def _fill_classifications(out: Any, result: Prediction, count: int) -> None:
    for row in classifications(result.outputs, count):
        classes = out.classifications.add()
        for label, score in row:
            classes.classes.add(label=label, score=float(score))


def _fill_regressions(out: Any, result: Prediction, count: int) -> None:
    for value in regressions(result.outputs, count):
        out.regressions.add(value=float(value))


def _model_name(request: Any) -> str:
    """The model a request names, for the metrics."""
    if hasattr(request, "model_spec"):
        return str(request.model_spec.name)
    tasks = getattr(request, "tasks", None)
    return str(tasks[0].model_spec.name) if tasks else ""


def _handler(services: Services, method: Callable[..., Awaitable[Any]], request_type: Any, verb: str) -> Any:
    """One unary RPC: errors to their gRPC code and text, metrics as REST's."""

    async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
        started = time.monotonic()
        model = ""
        status = 200
        try:
            model = _model_name(request)
            return await method(request, context)
        except TFBrokerError as exc:
            status = exc.http_status
            await context.abort(CODES.get(status, grpc.StatusCode.UNKNOWN), exc.message)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - a bug answers this RPC, not the process
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            status = 500
            log.exception("gRPC %s failed", verb)
            await context.abort(grpc.StatusCode.INTERNAL, Internal(f"frontend error: {type(exc).__name__}: {exc}")
                                .message)
        finally:
            if services.metrics is not None and verb in ("predict", "classify", "regress"):
                services.metrics.observe(model, verb, status, started, entrypoint="GRPC")
        raise AssertionError("unreachable: abort raises")

    return grpc.unary_unary_rpc_method_handler(handle, request_deserializer=request_type.FromString,
                                               response_serializer=lambda message: message.SerializeToString())


def handlers(services: Services) -> list[Any]:
    prediction = {
        "Predict": _handler(services, services.predict, pb.PredictRequest, "predict"),
        "Classify": _handler(services, services.classify, pb.ClassificationRequest, "classify"),
        "Regress": _handler(services, services.regress, pb.RegressionRequest, "regress"),
        "MultiInference": _handler(services, services.multi_inference, pb.MultiInferenceRequest, "multi_inference"),
        "GetModelMetadata": _handler(services, services.get_model_metadata, pb.GetModelMetadataRequest, "metadata"),
    }
    model = {"GetModelStatus": _handler(services, services.get_model_status, pb.GetModelStatusRequest, "status"),
             "HandleReloadConfigRequest": _handler(services, services.handle_reload_config_request,
                                                   pb.ReloadConfigRequest, "reload")}
    return [grpc.method_handlers_generic_handler("tensorflow.serving.PredictionService", prediction),
            grpc.method_handlers_generic_handler("tensorflow.serving.ModelService", model)]


async def start_server(services: Services) -> grpc.aio.Server:
    """The gRPC server on this process's event loop. Every frontend binds the same port
    (SO_REUSEPORT, gRPC's default on Linux), so the kernel spreads connections over them."""
    options = services.options
    server = grpc.aio.server(
        options=[("grpc.so_reuseport", 1), ("grpc.max_receive_message_length", services.limits.max_request_body_bytes),
                 ("grpc.max_send_message_length", -1), *channel_arguments(options.grpc_channel_arguments)],
        maximum_concurrent_rpcs=options.grpc_max_threads or None)
    server.add_generic_rpc_handlers(handlers(services))
    if options.enable_grpc_healthcheck_service:
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc

        health_servicer = health.aio.HealthServicer()
        for name in HEALTH_SERVICES:
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if options.port:
        server.add_insecure_port(f"[::]:{options.port}")
    if options.grpc_socket_path:
        server.add_insecure_port(f"unix:{options.grpc_socket_path}")
    await server.start()
    return server


