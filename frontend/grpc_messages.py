"""TF Serving's and the Open Inference Protocol's gRPC messages, from our own .proto files
(frontend/protos/), in a private descriptor pool.

The messages have TensorFlow's and TF Serving's full names (``tensorflow.TensorProto``,
``tensorflow.serving.PredictRequest``), so they are wire-compatible with TF Serving's
clients. They live in a pool of their own, not protobuf's default one, so this module
imports cleanly beside TensorFlow's generated modules (which register the same names in the
default pool) and never imports TensorFlow.

``frontend/protos/tfserving.binpb`` is the compiled FileDescriptorSet of those files
(``python -m frontend.grpc_messages`` makes it again with grpcio-tools; a test checks that
the committed one is up to date).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

PROTOS = Path(__file__).resolve().parent / "protos"
DESCRIPTOR_SET = PROTOS / "tfserving.binpb"
ROOT_PROTOS = ("tensorflow_serving.proto", "inference.proto")  # TF Serving's API, the Open Inference Protocol


def compile_descriptor_set() -> bytes:
    """The FileDescriptorSet of frontend/protos/, made with grpcio-tools' protoc (in a child:
    its protobuf runtime must not meet another one, TensorFlow's, in one process)."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "set.binpb"
        result = subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTOS}", f"--descriptor_set_out={out}",
                                 "--include_imports", *(str(PROTOS / root) for root in ROOT_PROTOS)],
                                capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"protoc failed on {', '.join(ROOT_PROTOS)}: {result.stderr}")
        return out.read_bytes()


if __name__ == "__main__":  # before the pool is loaded: the messages below may be new ones
    DESCRIPTOR_SET.write_bytes(compile_descriptor_set())
    print(f"wrote {DESCRIPTOR_SET}", file=sys.stderr)
    sys.exit(0)


def _load_pool() -> descriptor_pool.DescriptorPool:
    files = descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTOR_SET.read_bytes())
    pool = descriptor_pool.DescriptorPool()
    for file in files.file:
        pool.Add(file)
    return pool


POOL = _load_pool()


def message_class(full_name: str) -> Any:
    return message_factory.GetMessageClass(POOL.FindMessageTypeByName(full_name))


def enum_values(full_name: str) -> dict[str, int]:
    return {value.name: value.number for value in POOL.FindEnumTypeByName(full_name).values}


TensorProto = message_class("tensorflow.TensorProto")
TensorShapeProto = message_class("tensorflow.TensorShapeProto")
Example = message_class("tensorflow.Example")
Feature = message_class("tensorflow.Feature")
SignatureDefMap = message_class("tensorflow.serving.SignatureDefMap")
ModelSpec = message_class("tensorflow.serving.ModelSpec")
PredictRequest = message_class("tensorflow.serving.PredictRequest")
PredictResponse = message_class("tensorflow.serving.PredictResponse")
ClassificationRequest = message_class("tensorflow.serving.ClassificationRequest")
ClassificationResponse = message_class("tensorflow.serving.ClassificationResponse")
RegressionRequest = message_class("tensorflow.serving.RegressionRequest")
RegressionResponse = message_class("tensorflow.serving.RegressionResponse")
MultiInferenceRequest = message_class("tensorflow.serving.MultiInferenceRequest")
MultiInferenceResponse = message_class("tensorflow.serving.MultiInferenceResponse")
GetModelMetadataRequest = message_class("tensorflow.serving.GetModelMetadataRequest")
GetModelMetadataResponse = message_class("tensorflow.serving.GetModelMetadataResponse")
GetModelStatusRequest = message_class("tensorflow.serving.GetModelStatusRequest")
GetModelStatusResponse = message_class("tensorflow.serving.GetModelStatusResponse")
ReloadConfigRequest = message_class("tensorflow.serving.ReloadConfigRequest")
ReloadConfigResponse = message_class("tensorflow.serving.ReloadConfigResponse")
PredictionLog = message_class("tensorflow.serving.PredictionLog")  # request logs (frontend/request_log.py)
DATA_TYPES = enum_values("tensorflow.DataType")  # DT_FLOAT -> 1, …

# The Open Inference Protocol (frontend/oip_grpc.py).
ServerLiveRequest = message_class("inference.ServerLiveRequest")
ServerLiveResponse = message_class("inference.ServerLiveResponse")
ServerReadyRequest = message_class("inference.ServerReadyRequest")
ServerReadyResponse = message_class("inference.ServerReadyResponse")
ModelReadyRequest = message_class("inference.ModelReadyRequest")
ModelReadyResponse = message_class("inference.ModelReadyResponse")
ServerMetadataRequest = message_class("inference.ServerMetadataRequest")
ServerMetadataResponse = message_class("inference.ServerMetadataResponse")
ModelMetadataRequest = message_class("inference.ModelMetadataRequest")
ModelMetadataResponse = message_class("inference.ModelMetadataResponse")
ModelInferRequest = message_class("inference.ModelInferRequest")
ModelInferResponse = message_class("inference.ModelInferResponse")
ModelStreamInferResponse = message_class("inference.ModelStreamInferResponse")
RepositoryIndexRequest = message_class("inference.RepositoryIndexRequest")
RepositoryIndexResponse = message_class("inference.RepositoryIndexResponse")
RepositoryModelLoadRequest = message_class("inference.RepositoryModelLoadRequest")
RepositoryModelLoadResponse = message_class("inference.RepositoryModelLoadResponse")
RepositoryModelUnloadRequest = message_class("inference.RepositoryModelUnloadRequest")
RepositoryModelUnloadResponse = message_class("inference.RepositoryModelUnloadResponse")
ModelStatisticsRequest = message_class("inference.ModelStatisticsRequest")
ModelStatisticsResponse = message_class("inference.ModelStatisticsResponse")

