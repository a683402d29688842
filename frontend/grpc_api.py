"""TF Serving's gRPC API: PredictionService and ModelService, served by every frontend process
beside HTTP (frontend/grpc_server.py), on the same event loop and through the same Pipeline,
so one copy of each model, the same batching, deadlines, limits, version pinning and metrics.

The RPC's deadline is the request's deadline all the way to the worker (capped by
``--rest_api_timeout_in_ms``); a cancelled RPC cancels its queued request. Errors carry
the gRPC code of their class (tfbroker/wire/errors.py) and the REST API's texts.
Messages come from frontend/grpc_messages.py (our own protos, a private descriptor pool).
"""

from __future__ import annotations

from typing import Any, Callable

import grpc
from google.protobuf import json_format, text_format

from frontend import grpc_messages as pb
from frontend.grpc_handlers import unary
from frontend.grpc_tensors import from_proto, to_proto
from frontend.model_call import CLASSIFY, METADATA, PREDICT, REGRESS, RELOAD, STATUS, ModelCall
from frontend.pipeline import Pipeline
from frontend.tf_example import fill_classifications, fill_regressions
from tfbroker.client import Prediction
from tfbroker.wire.errors import InvalidArgument

SIGNATURE_DEF_MAP_URL = "type.googleapis.com/tensorflow.serving.SignatureDefMap"
CLASSIFY_METHOD = "tensorflow/serving/classify"
REGRESS_METHOD = "tensorflow/serving/regress"


class Services:
    """TF Serving's RPCs: each parses its request into a ModelCall and formats the answer;
    the frontend's Pipeline does the rest."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.options = pipeline.config.grpc

    # --- PredictionService ---

    async def predict(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        spec = request.model_spec

        async def parse() -> ModelCall:
            inputs = {name: from_proto(name, tensor) for name, tensor in request.inputs.items()}
            return ModelCall(PREDICT, spec.name, **_choice(spec), inputs=inputs, exact_dtypes=True,
                             timeout_s=context.time_remaining(), answer_as=request)

        return await self.pipeline.run("GRPC", PREDICT, spec.name, parse, self._predict_response, context)

    def _predict_response(self, call: ModelCall, result: Prediction) -> Any:
        request = call.answer_as
        outputs = result.outputs
        if request.output_filter:
            missing = [name for name in request.output_filter if name not in outputs]
            if missing:
                raise InvalidArgument(f"output tensor alias not found in signature: {missing[0]} Outputs expected "
                                      f"to be in the set {{{','.join(sorted(outputs))}}}.")
            outputs = {name: outputs[name] for name in request.output_filter}
        response = pb.PredictResponse()
        _answer_spec(response.model_spec, request.model_spec, result)
        for name, array in outputs.items():
            response.outputs[name].CopyFrom(to_proto(array, as_content=self.options.enable_serialization_as_tensor_content))
        return response

    async def classify(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._examples(CLASSIFY, request.model_spec, request.input, context, _classify_response)

    async def regress(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._examples(REGRESS, request.model_spec, request.input, context, _regress_response)

    async def multi_inference(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """Each task on the same examples (TF Serving: one model, classify or regress); each
        task is one call through the pipeline."""
        if not request.tasks:
            raise InvalidArgument("Expected at least one task")
        if len({task.model_spec.name for task in request.tasks}) > 1:
            raise InvalidArgument("All ModelSpecs in a MultiInferenceRequest must access the same model name.")
        signatures = [task.model_spec.signature_name for task in request.tasks]
        if len(set(signatures)) < len(signatures):
            raise InvalidArgument("Duplicate evaluation of signature: " + next(
                s for s in signatures if signatures.count(s) > 1))
        for task in request.tasks:
            if task.method_name not in (CLASSIFY_METHOD, REGRESS_METHOD):
                raise InvalidArgument(f"Unsupported signature method_name: {task.method_name}")
        response = pb.MultiInferenceResponse()
        for task in request.tasks:
            out = response.results.add()
            if task.method_name == CLASSIFY_METHOD:
                answer = await self._examples(CLASSIFY, task.model_spec, request.input, context, _classify_response)
                out.classification_result.CopyFrom(answer.result)
            else:
                answer = await self._examples(REGRESS, task.model_spec, request.input, context, _regress_response)
                out.regression_result.CopyFrom(answer.result)
            out.model_spec.CopyFrom(answer.model_spec)
        return response

    async def get_model_metadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        spec = request.model_spec

        async def parse() -> ModelCall:
            if not request.metadata_field:
                raise InvalidArgument("GetModelMetadataRequest must specify at least one metadata_field")
            for field in request.metadata_field:
                if field != "signature_def":
                    raise InvalidArgument(f"Metadata field {field} is not supported")
            return ModelCall(METADATA, spec.name, **_version(spec))

        return await self.pipeline.run("GRPC", METADATA, spec.name, parse, _metadata_response)

    # --- ModelService ---

    async def get_model_status(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        spec = request.model_spec

        async def parse() -> ModelCall:
            return ModelCall(STATUS, spec.name, **_version(spec))

        return await self.pipeline.run("GRPC", STATUS, spec.name, parse, _status_response)

    async def handle_reload_config_request(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """The config replaces the served models (TF Serving's text format to the broker)."""

        async def parse() -> ModelCall:
            if request.config.WhichOneof("config") != "model_config_list":
                raise InvalidArgument("ServerConfig type not supported: only model_config_list is")
            return ModelCall(RELOAD, inputs=text_format.MessageToString(request.config))

        return await self.pipeline.run("GRPC", RELOAD, "", parse, _reload_response)

    # --- implementation ---

    async def _examples(self, verb: str, spec: Any, given: Any, context: grpc.aio.ServicerContext,
                        respond: Callable[[ModelCall, Prediction], Any]) -> Any:
        async def parse() -> ModelCall:
            return ModelCall(verb, spec.name, **_choice(spec), inputs=serialized_examples(given),
                             timeout_s=context.time_remaining(), answer_as=spec)

        return await self.pipeline.run("GRPC", verb, spec.name, parse, respond, context)


def _classify_response(call: ModelCall, result: Prediction) -> Any:
    response = pb.ClassificationResponse()
    _answer_spec(response.model_spec, call.answer_as, result)
    fill_classifications(response.result, result.outputs, len(call.inputs))
    return response


def _regress_response(call: ModelCall, result: Prediction) -> Any:
    response = pb.RegressionResponse()
    _answer_spec(response.model_spec, call.answer_as, result)
    fill_regressions(response.result, result.outputs, len(call.inputs))
    return response


def _metadata_response(call: ModelCall, reply: dict[str, Any]) -> Any:
    signature_map = json_format.ParseDict(reply["signature_def"], pb.SignatureDefMap(), ignore_unknown_fields=True)
    response = pb.GetModelMetadataResponse()
    response.model_spec.name = call.model
    response.model_spec.version.value = reply["version"]
    response.metadata["signature_def"].Pack(signature_map)
    return response


def _status_response(call: ModelCall, status: dict[str, Any]) -> Any:
    return json_format.ParseDict({"model_version_status": status["model_version_status"]},
                                 pb.GetModelStatusResponse(), ignore_unknown_fields=True)


def _reload_response(call: ModelCall, result: Any) -> Any:
    response = pb.ReloadConfigResponse()
    response.status.error_code = 0  # OK
    return response


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


def handlers(pipeline: Pipeline) -> list[Any]:
    services = Services(pipeline)
    prediction = {
        "Predict": unary(services.predict, pb.PredictRequest),
        "Classify": unary(services.classify, pb.ClassificationRequest),
        "Regress": unary(services.regress, pb.RegressionRequest),
        "MultiInference": unary(services.multi_inference, pb.MultiInferenceRequest),
        "GetModelMetadata": unary(services.get_model_metadata, pb.GetModelMetadataRequest),
    }
    model = {"GetModelStatus": unary(services.get_model_status, pb.GetModelStatusRequest),
             "HandleReloadConfigRequest": unary(services.handle_reload_config_request, pb.ReloadConfigRequest)}
    return [grpc.method_handlers_generic_handler("tensorflow.serving.PredictionService", prediction),
            grpc.method_handlers_generic_handler("tensorflow.serving.ModelService", model)]
