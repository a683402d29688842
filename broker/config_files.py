"""TF Serving's text-protobuf config files, parsed by protobuf into our dataclasses.

``--model_config_file`` uses TF Serving's own ``ModelServerConfig`` (from
tensorflow-serving-api, which imports without TensorFlow). ``BatchingParameters`` is not in
that package, so its message is defined here with TF Serving's field names and numbers
(session_bundle_config.proto) and built at import time.
"""

from __future__ import annotations

import importlib
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, text_format
from google.protobuf import wrappers_pb2  # noqa: F401  (registers google/protobuf/wrappers.proto)
from google.protobuf.message_factory import GetMessageClass

from broker.config import BatchingParameters, ModelConfig, ModelVersionPolicy, RequestLogging
from tfbroker.wire.errors import ConfigError


def _batching_parameters_message() -> type:
    fdp = descriptor_pb2.FileDescriptorProto(
        name="tfbroker/batching_parameters.proto",
        package="tensorflow.serving",
        syntax="proto3",
        dependency=["google/protobuf/wrappers.proto"],
    )
    msg = fdp.message_type.add(name="BatchingParameters")
    F = descriptor_pb2.FieldDescriptorProto
    for name, number, wrapper in [
        ("max_batch_size", 1, ".google.protobuf.Int64Value"),
        ("batch_timeout_micros", 2, ".google.protobuf.Int64Value"),
        ("max_enqueued_batches", 3, ".google.protobuf.Int64Value"),
        ("num_batch_threads", 4, ".google.protobuf.Int64Value"),
        ("thread_pool_name", 5, ".google.protobuf.StringValue"),
    ]:
        msg.field.add(name=name, number=number, type=F.TYPE_MESSAGE, type_name=wrapper,
                      label=F.LABEL_OPTIONAL)
    msg.field.add(name="allowed_batch_sizes", number=6, type=F.TYPE_INT64, label=F.LABEL_REPEATED)
    msg.field.add(name="pad_variable_length_inputs", number=7, type=F.TYPE_BOOL, label=F.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(descriptor_pb2.FileDescriptorProto.FromString(
        wrappers_pb2.DESCRIPTOR.serialized_pb).SerializeToString())
    pool.AddSerializedFile(fdp.SerializeToString())
    return GetMessageClass(pool.FindMessageTypeByName("tensorflow.serving.BatchingParameters"))


BatchingParametersProto = _batching_parameters_message()


def _monitoring_config_message() -> type:
    """TF Serving's MonitoringConfig (config/monitoring_config.proto), same names and numbers."""
    fdp = descriptor_pb2.FileDescriptorProto(name="tfbroker/monitoring_config.proto", package="tensorflow.serving",
                                             syntax="proto3")
    F = descriptor_pb2.FieldDescriptorProto
    prometheus = fdp.message_type.add(name="PrometheusConfig")
    prometheus.field.add(name="enable", number=1, type=F.TYPE_BOOL, label=F.LABEL_OPTIONAL)
    prometheus.field.add(name="path", number=2, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    monitoring = fdp.message_type.add(name="MonitoringConfig")
    monitoring.field.add(name="prometheus_config", number=1, type=F.TYPE_MESSAGE, label=F.LABEL_OPTIONAL,
                         type_name=".tensorflow.serving.PrometheusConfig")
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(fdp.SerializeToString())
    return GetMessageClass(pool.FindMessageTypeByName("tensorflow.serving.MonitoringConfig"))


MonitoringConfigProto = _monitoring_config_message()
DEFAULT_METRICS_PATH = "/monitoring/prometheus/metrics"  # TF Serving's default


def load_metrics_path(path: str) -> str:
    """The Prometheus path a --monitoring_config_file enables, or "" when it enables none."""
    proto = MonitoringConfigProto()
    try:
        text_format.Parse(_read(path, "monitoring config file"), proto)
    except text_format.ParseError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    if not proto.prometheus_config.enable:
        return ""
    metrics_path = proto.prometheus_config.path or DEFAULT_METRICS_PATH
    if not metrics_path.startswith("/") or metrics_path.lower().startswith("/v1/"):
        raise ConfigError(f"{path}: the Prometheus path must start with / and not be under /v1/, got {metrics_path!r}")
    return metrics_path


def _read(path: str, what: str) -> str:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from exc


def parse_batching_parameters(text: str, *, source: str = "batching parameters") -> BatchingParameters:
    """BatchingParameters from TF Serving's text format; unset fields keep our defaults."""
    proto = BatchingParametersProto()
    try:
        text_format.Parse(text, proto)
    except text_format.ParseError as exc:
        raise ConfigError(f"{source}: {exc}") from exc
    values: dict[str, object] = {}
    for name in ("max_batch_size", "batch_timeout_micros", "max_enqueued_batches", "num_batch_threads"):
        if proto.HasField(name):
            values[name] = getattr(proto, name).value
    if proto.allowed_batch_sizes:
        values["allowed_batch_sizes"] = tuple(proto.allowed_batch_sizes)
    values["pad_variable_length_inputs"] = proto.pad_variable_length_inputs
    return BatchingParameters(**values)  # type: ignore[arg-type]


def load_batching_parameters(path: str) -> BatchingParameters:
    return parse_batching_parameters(_read(path, "batching parameters file"), source=path)


def parse_model_config(text: str, *, source: str = "model config") -> list[ModelConfig]:
    """The models of a ModelServerConfig's model_config_list."""
    # TF Serving's config protos (tensorflow-serving-api); they do not import TensorFlow.
    config_pb2 = importlib.import_module("tensorflow_serving.config.model_server_config_pb2")
    proto = config_pb2.ModelServerConfig()
    try:
        text_format.Parse(text, proto)
    except text_format.ParseError as exc:
        raise ConfigError(f"{source}: {exc}") from exc
    if proto.WhichOneof("config") != "model_config_list":
        raise ConfigError(f"{source}: only model_config_list is supported")
    models = []
    for entry in proto.model_config_list.config:
        models.append(ModelConfig(
            name=entry.name,
            base_path=entry.base_path,
            model_platform=entry.model_platform or "tensorflow",
            model_version_policy=_version_policy(entry.model_version_policy),
            version_labels=tuple(sorted(entry.version_labels.items())),
            logging=_request_logging(entry.logging_config) if entry.HasField("logging_config") else None,
        ))
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise ConfigError(f"{source}: model names repeat: {names}")
    if not models:
        raise ConfigError(f"{source}: model_config_list names no model")
    return models


def _request_logging(proto: Any) -> RequestLogging:
    """TF Serving's LoggingConfig. A per-task rule matches here only without ``dc`` and
    ``task_index`` (one server, no cells), as TF Serving's first matching rule."""
    rate = proto.sampling_config.sampling_rate
    for rule in proto.sampling_config.per_task_sampling_configs:
        if not rule.dc and not rule.HasField("task_index"):
            rate = rule.sampling_rate
            break
    return RequestLogging(sampling_rate=rate, filename_prefix=proto.log_collector_config.filename_prefix,
                          collector=proto.log_collector_config.type)


def _version_policy(proto: Any) -> ModelVersionPolicy:
    """TF Serving's FileSystemStoragePathSourceConfig.ServableVersionPolicy; unset is latest 1."""
    kind = proto.WhichOneof("policy_choice")
    if kind == "all":
        return ModelVersionPolicy(kind="all")
    if kind == "specific":
        return ModelVersionPolicy(kind="specific", versions=tuple(proto.specific.versions))
    if kind == "latest":
        return ModelVersionPolicy(kind="latest", num_versions=proto.latest.num_versions or 1)
    return ModelVersionPolicy()


def load_model_config(path: str) -> list[ModelConfig]:
    return parse_model_config(_read(path, "model config file"), source=path)

