"""TF Serving's own Python client, in a child with TensorFlow (kept out of pytest):
``python tests/system/tfs_client.py HOST:PORT < calls.json > answers.json``.

Each call names a PredictionService, ModelService or Health RPC, its request as JSON (TF
Serving's message, json_format), and its inputs as arrays; the tensors are made with
``tf.make_tensor_proto`` (tensor_content) or put in the typed fields, as a client would.
Each answer: the status code and details, the response as JSON, and each output tensor
read with ``tf.make_ndarray``. A call may be cancelled after ``cancel_after_s``.
"""

from __future__ import annotations

import json
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import grpc
import numpy as np
import tensorflow as tf
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tensorflow_serving.apis import (classification_pb2, get_model_metadata_pb2, get_model_status_pb2, inference_pb2,
                                     model_management_pb2, model_service_pb2_grpc, predict_pb2,
                                     prediction_service_pb2_grpc, regression_pb2)

REQUESTS = {"Predict": predict_pb2.PredictRequest, "Classify": classification_pb2.ClassificationRequest,
            "Regress": regression_pb2.RegressionRequest, "MultiInference": inference_pb2.MultiInferenceRequest,
            "GetModelMetadata": get_model_metadata_pb2.GetModelMetadataRequest,
            "GetModelStatus": get_model_status_pb2.GetModelStatusRequest,
            "HandleReloadConfigRequest": model_management_pb2.ReloadConfigRequest}
TYPED = {"float32": "float_val", "float64": "double_val", "int32": "int_val", "int64": "int64_val",
         "bool": "bool_val", "object": "string_val"}


def tensor(spec: dict[str, Any]) -> Any:
    array = np.array(spec["values"], dtype=spec["dtype"] if spec["dtype"] != "string" else object)
    if spec["dtype"] == "string":
        array = np.array([v.encode() for v in array.reshape(-1)], dtype=object).reshape(array.shape)
    proto = tf.make_tensor_proto(array, shape=spec.get("shape"))
    if not spec.get("content", True) and array.dtype != object:
        values = array.reshape(-1).tolist()
        proto.ClearField("tensor_content")
        getattr(proto, TYPED[array.dtype.name]).extend(values[:1] if spec.get("fill") else values)
    return proto


def read(proto: Any) -> dict[str, Any]:
    array = tf.make_ndarray(proto)
    values = array.tolist() if array.dtype != object else np.vectorize(bytes.decode, otypes=[object])(array).tolist()
    return {"values": values, "dtype": "string" if array.dtype == object else array.dtype.name,
            "content": bool(proto.tensor_content)}


def call(channel: grpc.Channel, spec: dict[str, Any]) -> dict[str, Any]:
    rpc = spec["rpc"]
    if rpc == "HealthCheck":
        stub: Any = health_pb2_grpc.HealthStub(channel)
        method, request = stub.Check, health_pb2.HealthCheckRequest(service=spec["request"].get("service", ""))
    else:
        request = json_format.ParseDict(spec.get("request", {}), REQUESTS[rpc]())
        for name, given in spec.get("inputs", {}).items():
            request.inputs[name].CopyFrom(tensor(given))
        service = (model_service_pb2_grpc.ModelServiceStub if rpc in ("GetModelStatus", "HandleReloadConfigRequest")
                   else prediction_service_pb2_grpc.PredictionServiceStub)
        method = getattr(service(channel), rpc)
    started = time.monotonic()
    future = method.future(request, timeout=spec.get("timeout_s", 30))
    if "cancel_after_s" in spec:
        time.sleep(spec["cancel_after_s"])
        future.cancel()
    try:
        response = future.result()
    except grpc.FutureCancelledError:
        return {"code": "CANCELLED", "details": "", "seconds": time.monotonic() - started}
    except grpc.RpcError as exc:
        return {"code": exc.code().name, "details": exc.details(), "seconds": time.monotonic() - started}
    answer: dict[str, Any] = {"code": "OK", "seconds": time.monotonic() - started,
                              "response": json_format.MessageToDict(response, preserving_proto_field_name=True)}
    if rpc == "Predict":
        answer["outputs"] = {name: read(t) for name, t in response.outputs.items()}
    if rpc == "GetModelMetadata":
        signatures = get_model_metadata_pb2.SignatureDefMap()
        answer["type_url"] = response.metadata["signature_def"].type_url
        response.metadata["signature_def"].Unpack(signatures)
        answer["signature_def"] = json_format.MessageToDict(signatures, preserving_proto_field_name=True)
    return answer


def main() -> None:
    calls = json.load(sys.stdin)
    with grpc.insecure_channel(sys.argv[1]) as channel, ThreadPoolExecutor(4) as pool:
        grpc.channel_ready_future(channel).result(timeout=30)
        answers: list[Any] = []
        for spec in calls:
            if spec.get("background"):  # started now, answered in its place in the list
                answers.append(pool.submit(call, channel, spec))
                time.sleep(0.05)  # it reaches the broker first
            else:
                answers.append(call(channel, spec))
        json.dump([a.result() if isinstance(a, Future) else a for a in answers], sys.stdout)


if __name__ == "__main__":
    main()
