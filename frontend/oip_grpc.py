"""The Open Inference Protocol over gRPC: ``inference.GRPCInferenceService`` on the gRPC port,
beside TF Serving's services (frontend/grpc_server.py), through the same Pipeline.

ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelInfer,
ModelStreamInfer (Triton's streaming extension: every request of a stream answered in the
order it came, each one batched with everyone else's) and the model repository extension
(RepositoryIndex; RepositoryModelLoad and RepositoryModelUnload with the broker's
--enable_model_control) and the statistics extension (ModelStatistics: frontend/oip_stats.py).
A request's tensors come in the typed
``contents`` or in ``raw_input_contents`` (tritonclient's default), the latter forwarded to
the broker as the bytes they are; outputs go back in ``raw_output_contents``, as Triton
answers. ``model_version`` is a number, a version label, or empty for the latest. Errors
carry the gRPC code of their class (INVALID_ARGUMENT, NOT_FOUND, UNAVAILABLE,
DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED); in a stream, an answer's ``error_message``.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any, AsyncIterator

import grpc
import numpy as np
from google.protobuf import json_format

from frontend import grpc_messages as pb
from frontend import oip_tensors
from frontend.grpc_handlers import stream, unary
from frontend.oip_stats import model_statistics
from frontend.model_call import METADATA, PREDICT, REPOSITORY, ModelCall
from frontend.pipeline import Pipeline
from tfbroker.client import Prediction
from tfbroker.wire.errors import InvalidArgument, TFBrokerError

# The typed field of InferTensorContents that carries each datatype (FP16 has none: raw only).
CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
            "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
            "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
            "FP64": "fp64_contents", "BYTES": "bytes_contents"}


class InferenceService:
    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline

    async def server_live(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def server_ready(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        ready, _ = await self.pipeline.ready()
        return pb.ServerReadyResponse(ready=ready)

    async def model_ready(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        version, label = oip_tensors.version_or_label(request.version)
        ready, _ = await self.pipeline.ready(request.name, version, label)
        return pb.ModelReadyResponse(ready=ready)

    async def server_metadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerMetadataResponse(**oip_tensors.SERVER_METADATA)

    async def model_metadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def parse() -> ModelCall:
            version, label = oip_tensors.version_or_label(request.version)
            status = await self.pipeline.client.status(request.name)
            return ModelCall(METADATA, request.name, version, label,
                             answer_as=oip_tensors.available_versions(status))

        return await self.pipeline.run("GRPC", METADATA, request.name, parse, _metadata_response)

    async def model_infer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def parse() -> ModelCall:
            return parse_infer(request, context.time_remaining())

        return await self.pipeline.run("GRPC", PREDICT, request.model_name, parse, format_infer, context)

    async def model_stream_infer(self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
                                 ) -> AsyncIterator[Any]:
        """Every request of the stream starts as it comes (so they batch with each other and
        everyone else's); the answers go back in the order the requests came."""
        started: asyncio.Queue[asyncio.Future[Any] | None] = asyncio.Queue()

        async def read() -> None:
            try:
                async for request in requests:
                    started.put_nowait(asyncio.ensure_future(self.model_infer(request, context)))
            finally:
                started.put_nowait(None)

        reader = asyncio.ensure_future(read())
        try:
            while (answer := await started.get()) is not None:
                try:
                    yield pb.ModelStreamInferResponse(infer_response=await answer)
                except TFBrokerError as exc:
                    yield pb.ModelStreamInferResponse(error_message=exc.message)
            await reader  # its error, if reading failed
        finally:
            reader.cancel()
            while not started.empty():
                left = started.get_nowait()
                if left is not None:
                    left.cancel()


    async def repository_index(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def parse() -> ModelCall:
            return ModelCall(REPOSITORY, inputs=("index", request.ready))

        def answer(call: ModelCall, reply: dict[str, Any]) -> Any:
            response = pb.RepositoryIndexResponse()
            for entry in reply["models"]:
                response.models.add(**entry)
            return response

        return await self.pipeline.run("GRPC", REPOSITORY, "", parse, answer)

    async def model_statistics(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """The statistics extension (frontend/oip_stats.py), as REST's ``/stats``."""
        version, label = oip_tensors.version_or_label(request.version)
        stats = await self.pipeline.client.stats_reply()
        response = pb.ModelStatisticsResponse()
        json_format.ParseDict({"model_stats": model_statistics(stats, request.name, version, label)}, response)
        return response

    async def repository_model_load(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._repository_change("load", request.model_name, pb.RepositoryModelLoadResponse)

    async def repository_model_unload(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._repository_change("unload", request.model_name, pb.RepositoryModelUnloadResponse)

    async def _repository_change(self, op: str, model: str, response: Any) -> Any:
        async def parse() -> ModelCall:
            return ModelCall(REPOSITORY, model, inputs=(op, False))

        return await self.pipeline.run("GRPC", REPOSITORY, model, parse, lambda call, reply: response())


def parse_infer(request: Any, asked_s: float | None) -> ModelCall:
    version, label = oip_tensors.version_or_label(request.model_version)
    if not request.inputs:
        raise InvalidArgument("the request has no inputs")
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgument(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs: give one per input, "
                              "in the inputs' order")
    tensors: dict[str, Any] = {}
    for i, given in enumerate(request.inputs):
        name = given.name
        if name in tensors:
            raise InvalidArgument(f"input '{name}' is given twice")
        dtype = oip_tensors.datatype_dtype(name, given.datatype)
        shape = oip_tensors.checked_shape(name, list(given.shape))
        if raw:
            if given.HasField("contents"):
                raise InvalidArgument(f"input '{name}': contents and raw_input_contents both given")
            tensors[name] = oip_tensors.from_binary(name, dtype, shape, raw[i])
        else:
            tensors[name] = _from_contents(name, given.datatype, dtype, shape, given.contents)
    parameters = request.parameters
    signature = parameters["signature_name"].string_param if "signature_name" in parameters else "serving_default"
    asked = [output.name for output in request.outputs] or None
    return ModelCall(PREDICT, request.model_name, version, label, signature or "serving_default", tensors,
                     exact_dtypes=True, timeout_s=asked_s, answer_as=(request.id, asked))


def format_infer(call: ModelCall, prediction: Prediction) -> Any:
    request_id, asked = call.answer_as
    outputs = prediction.outputs
    names = asked if asked is not None else list(outputs)
    missing = [name for name in names if name not in outputs]
    if missing:
        raise InvalidArgument(f"output '{missing[0]}' is not an output of the signature; it has "
                              f"{', '.join(sorted(outputs))}")
    response = pb.ModelInferResponse(model_name=call.model, model_version=str(prediction.version), id=request_id)
    for name in names:
        array = outputs[name]
        response.outputs.add(name=name, datatype=oip_tensors.output_datatype(array), shape=array.shape)
        response.raw_output_contents.append(oip_tensors.to_binary(array))
    return response


def _from_contents(name: str, datatype: str, dtype: str, shape: tuple[int, ...], contents: Any) -> np.ndarray:
    field = CONTENTS.get(datatype)
    if field is None:
        raise InvalidArgument(f"input '{name}': {datatype} data goes in raw_input_contents (it has no typed field)")
    values = getattr(contents, field)
    count = math.prod(shape)
    if len(values) != count:
        raise InvalidArgument(f"input '{name}': shape {list(shape)} holds {count} elements, {field} has {len(values)}")
    if dtype == "string":
        array = np.empty(count, dtype=object)
        array[:] = list(values)
        return array.reshape(shape)
    array = np.array(values, dtype=np.int64 if dtype[0] in "iu" and dtype != "uint64" else None)
    if dtype[0] in "iu" and count:
        info = np.iinfo(dtype)
        if array.min() < info.min or array.max() > info.max:
            raise InvalidArgument(f"input '{name}': a value is out of {datatype}'s range")
    return array.astype(dtype).reshape(shape)


def _metadata_response(call: ModelCall, reply: dict[str, Any]) -> Any:
    described = oip_tensors.describe_model(call.model, call.answer_as, reply)
    response = pb.ModelMetadataResponse(name=described["name"], versions=described["versions"],
                                        platform=described["platform"])
    for tensor in described["inputs"]:
        response.inputs.add(**tensor)
    for tensor in described["outputs"]:
        response.outputs.add(**tensor)
    return response


def handlers(pipeline: Pipeline) -> list[Any]:
    service = InferenceService(pipeline)
    methods = {
        "ServerLive": unary(service.server_live, pb.ServerLiveRequest),
        "ServerReady": unary(service.server_ready, pb.ServerReadyRequest),
        "ModelReady": unary(service.model_ready, pb.ModelReadyRequest),
        "ServerMetadata": unary(service.server_metadata, pb.ServerMetadataRequest),
        "ModelMetadata": unary(service.model_metadata, pb.ModelMetadataRequest),
        "ModelInfer": unary(service.model_infer, pb.ModelInferRequest),
        "ModelStreamInfer": stream(service.model_stream_infer, pb.ModelInferRequest),
        "RepositoryIndex": unary(service.repository_index, pb.RepositoryIndexRequest),
        "RepositoryModelLoad": unary(service.repository_model_load, pb.RepositoryModelLoadRequest),
        "RepositoryModelUnload": unary(service.repository_model_unload, pb.RepositoryModelUnloadRequest),
        "ModelStatistics": unary(service.model_statistics, pb.ModelStatisticsRequest),
    }
    return [grpc.method_handlers_generic_handler("inference.GRPCInferenceService", methods)]
