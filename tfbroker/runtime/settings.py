"""What every role agrees on, in one place: environment names, defaults, limits, addresses,
and the configuration the broker hands each child it starts (as flags: tfbroker/runtime/flags.py).

The broker's own configuration (TF Serving's flags and files) is broker/config.py; it builds
on what is here.
"""

from __future__ import annotations

import os
import shlex
import tempfile
from dataclasses import dataclass, field

from tfbroker.wire.errors import ConfigError


def field_help(text: str) -> dict[str, str]:
    """A dataclass field's ``metadata``: its one line of documentation, which is also its flag's help."""
    return {"help": text}


# Liveness defaults, used by the broker, its workers and the clients alike.
DEFAULT_HEARTBEAT_INTERVAL_S = 1.0
DEFAULT_HEARTBEAT_LIVENESS = 10
DEFAULT_TIMEOUT_MS = 30000  # TF Serving's --rest_api_timeout_in_ms

# Environment variables the broker sets for the frontends it starts; under gunicorn the
# operator sets them (ops/gunicorn.conf.py).
ADDRESS_ENV = "TFBROKER_ADDRESS"  # the broker's frontend socket
FRONTEND_INDEX_ENV = "TFBROKER_FRONTEND_INDEX"  # N in the title "tfbroker: frontend:N"
FRONTENDS_ENV = "TFBROKER_FRONTENDS"  # gunicorn workers (frontend/gunicorn_conf.py)
BIND_ENV = "TFBROKER_BIND"  # gunicorn's bind address; fd://N for the broker's listening socket
LOG_LEVEL_ENV = "TFBROKER_LOG_LEVEL"
FRONTEND_ENV = "TFBROKER_FRONTEND"  # FrontendConfig as flags (tfbroker/runtime/flags.py)
# Before FrontendConfig, one variable per setting; still read (FrontendConfig.from_env), as flags.
LEGACY_FRONTEND_ENV = {"TFBROKER_TIMEOUT_MS": "--rest_api_timeout_in_ms={}", "TFBROKER_LIMITS": "{}",
                       "TFBROKER_GRPC": "--port=8500 {}", "TFBROKER_METRICS_PATH": "--metrics_path={}",
                       "TFBROKER_STATUS_PAGE": "--enable_status_page={}"}
# prometheus-client's directory for the frontends' shared counters (multiprocess mode).
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


def default_runtime_dir(rest_api_port: int) -> str:
    """Where a broker's ipc:// sockets live unless --runtime_dir says otherwise: one
    directory per HTTP port, so brokers on different ports share a host's runtime directories."""
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return os.path.join(base, f"tfbroker-{os.getuid()}-{rest_api_port}")


def ipc_address(runtime_dir: str, name: str) -> str:
    return f"ipc://{os.path.join(runtime_dir, name)}"


def local_address(address: str) -> bool:
    """Whether a ZeroMQ address is reachable from this host only (ipc://, inproc:// or loopback)."""
    if address.startswith(("ipc://", "inproc://")):
        return True
    host = address.partition("://")[2].rpartition(":")[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")




def default_frontend_address(rest_api_port: int = 8501) -> str:
    """Where a broker on this host takes clients unless told otherwise (--frontend_address)."""
    return ipc_address(default_runtime_dir(rest_api_port), "frontend.sock")


@dataclass(frozen=True, kw_only=True, slots=True)
class RequestLimits:
    """What one HTTP request may hold; each is refused before anything larger is allocated.

    Header count and size are uvicorn's (h11/httptools limits)."""

    max_request_body_bytes: int = field(default=64 << 20, metadata=field_help(
        "Largest HTTP request body; a larger one gets 413 before it is read."))
    max_json_depth: int = field(default=32, metadata=field_help(
        "Deepest nesting of lists in a tensor value (its rank); deeper gets 400."))
    max_instances: int = field(default=100_000, metadata=field_help(
        "Most instances (rows) in one request; more gets 400."))
    max_string_bytes: int = field(default=16 << 20, metadata=field_help(
        "Longest single string or b64 value, decoded; longer gets 400."))
    max_tensor_bytes: int = field(default=256 << 20, metadata=field_help(
        "Most bytes of tensors in one request (also the largest ZeroMQ frame the broker takes); "
        "more gets 400."))
    max_concurrent_predictions: int = field(default=512, metadata=field_help(
        "Predictions one frontend has waiting on the broker; beyond it, 503 with Retry-After at once, "
        "before the body is parsed. With the broker's queue bound it caps how long an admitted request waits."))

    def __post_init__(self) -> None:
        for name in ("max_request_body_bytes", "max_json_depth", "max_instances", "max_string_bytes",
                     "max_tensor_bytes", "max_concurrent_predictions"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True, kw_only=True, slots=True)
class GrpcOptions:
    """TF Serving's gRPC flags: every frontend serves its gRPC API beside HTTP."""

    port: int = field(default=8500, metadata=field_help(
        "Port of TF Serving's gRPC API (PredictionService, ModelService), served by every frontend; 0: none."))
    grpc_socket_path: str = field(default="", metadata=field_help(
        "A unix socket path the gRPC API listens on as well."))
    grpc_channel_arguments: str = field(default="", metadata=field_help(
        "Comma-separated gRPC server channel arguments, e.g. grpc.max_connection_age_ms=2000."))
    grpc_max_threads: int = field(default=0, metadata=field_help(
        "At most this many RPCs at once per frontend (TF Serving: server threads); 0: no limit "
        "beyond --max_concurrent_predictions."))
    enable_grpc_healthcheck_service: bool = field(default=False, metadata=field_help(
        "Serve grpc.health.v1.Health: SERVING for ModelService and PredictionService."))
    enable_serialization_as_tensor_content: bool = field(default=False, metadata=field_help(
        "Answer numeric gRPC outputs in tensor_content rather than the typed fields."))
    ssl_config_file: str = field(default="", metadata=field_help(
        "TF Serving's SSLConfig (text protobuf: server_key, server_cert, custom_ca, client_verify): the gRPC "
        "port and socket take TLS only, and with client_verify only clients whose certificate custom_ca signed."))
    use_alts_credentials: bool = field(default=False, metadata=field_help(
        "The gRPC port takes Google's ALTS only (on Google Cloud)."))

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ConfigError(f"port must be 0..65535, got {self.port}")
        if self.grpc_max_threads < 0:
            raise ConfigError(f"grpc_max_threads must be >= 0, got {self.grpc_max_threads}")
        channel_arguments(self.grpc_channel_arguments)  # checks them
        if self.use_alts_credentials and self.ssl_config_file:
            raise ConfigError("Either use_alts_credentials must be false or ssl_config_file must be empty.")
        if self.ssl_config_file:
            read_ssl_config(self.ssl_config_file)  # refused at start, not in every frontend

    @property
    def enabled(self) -> bool:
        return bool(self.port or self.grpc_socket_path)


DEFAULT_REQUEST_LOG_FILE_BYTES = 128 << 20


@dataclass(frozen=True, kw_only=True, slots=True)
class FrontendConfig:
    """Everything a frontend process takes, passed as flags in one environment variable,
    TFBROKER_FRONTEND (gunicorn owns the command line): the broker sets it for the frontends
    it starts; under your own gunicorn you set it (``TFBROKER_FRONTEND="--port=8500
    --rest_api_timeout_in_ms=10000"``). The groups' fields are flags of their own."""

    frontend_address: str = field(default="", metadata=field_help(
        "The broker's frontend socket; empty: TFBROKER_ADDRESS, else the broker on this host (port 8501)."))
    rest_api_timeout_in_ms: int = field(default=DEFAULT_TIMEOUT_MS, metadata=field_help(
        "A request's deadline, from when the frontend has it to its answer (a caller may ask for less)."))
    limits: RequestLimits = field(default_factory=RequestLimits)
    grpc: GrpcOptions = field(default_factory=lambda: GrpcOptions(port=0))
    metrics_path: str = field(default="", metadata=field_help(
        "The path of the Prometheus page on the REST port; empty: none."))
    enable_status_page: bool = field(default=False, metadata=field_help(
        "Serve the status page at /status and /status.json."))
    request_log_max_file_bytes: int = field(default=DEFAULT_REQUEST_LOG_FILE_BYTES, metadata=field_help(
        "Request logs (a model's logging_config): each frontend starts its next TFRecord file once "
        "its current one has this many bytes."))

    def __post_init__(self) -> None:
        if self.request_log_max_file_bytes < 1:
            raise ConfigError(f"request_log_max_file_bytes must be >= 1, got {self.request_log_max_file_bytes}")
        if self.rest_api_timeout_in_ms < 1:
            raise ConfigError(f"rest_api_timeout_in_ms must be >= 1, got {self.rest_api_timeout_in_ms}")

    @property
    def timeout_s(self) -> float:
        return self.rest_api_timeout_in_ms / 1000.0

    @classmethod
    def from_env(cls) -> FrontendConfig:
        """TFBROKER_FRONTEND's flags, after those of the variables it replaced (which it overrides)."""
        from tfbroker.runtime.flags import parse_flags

        argv: list[str] = []
        for name, form in LEGACY_FRONTEND_ENV.items():
            value = os.environ.get(name)
            if value:
                argv += shlex.split(form.format(value))
        argv += shlex.split(os.environ.get(FRONTEND_ENV, ""))
        try:
            return parse_flags(cls, argv)
        except SystemExit:  # argparse's way of saying a flag is wrong (it has printed why)
            raise ConfigError(f"{FRONTEND_ENV}: cannot use {' '.join(argv)!r}") from None


@dataclass(frozen=True, slots=True)
class SslConfig:
    """TF Serving's SSLConfig (tensorflow_serving/config/ssl_config.proto): PEM texts."""

    server_key: str = ""
    server_cert: str = ""
    custom_ca: str = ""
    client_verify: bool = False


def read_ssl_config(path: str) -> SslConfig:
    """The SSLConfig text protobuf at ``path``; ConfigError says what is wrong with it."""
    from google.protobuf import text_format

    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as exc:
        raise ConfigError(f"--ssl_config_file {path}: {exc.strerror}") from None
    message = _ssl_config_class()()
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as exc:
        raise ConfigError(f"--ssl_config_file {path} is not an SSLConfig text protobuf: {exc}") from None
    config = SslConfig(message.server_key, message.server_cert, message.custom_ca, message.client_verify)
    if not config.server_key or not config.server_cert:
        raise ConfigError(f"--ssl_config_file {path}: server_key and server_cert are both needed")
    if config.client_verify and not config.custom_ca:
        raise ConfigError(f"--ssl_config_file {path}: client_verify needs custom_ca, the CA that signs the clients")
    return config


def _ssl_config_class() -> type:
    """SSLConfig's message class, from its four fields (TF Serving's names and numbers)."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    kinds = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(name="tfbroker/ssl_config.proto", package="tensorflow.serving",
                                              syntax="proto3")
    message = file.message_type.add(name="SSLConfig")
    for number, (name, kind) in enumerate((("server_key", kinds.TYPE_STRING), ("server_cert", kinds.TYPE_STRING),
                                           ("custom_ca", kinds.TYPE_STRING), ("client_verify", kinds.TYPE_BOOL)), 1):
        message.field.add(name=name, number=number, type=kind, label=kinds.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    cls: type = message_factory.GetMessageClass(pool.FindMessageTypeByName("tensorflow.serving.SSLConfig"))
    return cls


def channel_arguments(text: str) -> tuple[tuple[str, int | str], ...]:
    """``grpc.max_connection_age_ms=2000,grpc.http2.max_pings_without_data=0`` as TF Serving
    takes it: integers where they parse, strings otherwise."""
    options: list[tuple[str, int | str]] = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--grpc_channel_arguments: {item!r} is not KEY=VALUE")
        options.append((key, int(value) if value.lstrip("-").isdigit() else value))
    return tuple(options)


@dataclass(frozen=True, kw_only=True, slots=True)
class TensorFlowOptions:
    """TF Serving's flags for how each model worker runs TensorFlow: flags of the broker,
    passed on to every worker as they are (a new one is one field here)."""

    tensorflow_intra_op_parallelism: int = field(default=0, metadata=field_help(
        "Threads a model worker gives one TensorFlow op; 0: --tensorflow_session_parallelism, else "
        "TensorFlow's choice (all cores)."))
    tensorflow_inter_op_parallelism: int = field(default=0, metadata=field_help(
        "TensorFlow ops a model worker runs at once; 0: --tensorflow_session_parallelism, else TensorFlow's "
        "choice; -1: each op in the calling thread (no pool: less per call on a host with few cores)."))
    tensorflow_session_parallelism: int = field(default=0, metadata=field_help(
        "Threads for both of TensorFlow's pools in each worker where --tensorflow_intra_op_parallelism or "
        "--tensorflow_inter_op_parallelism is 0; 0: TensorFlow's choice."))
    saved_model_tags: str = field(default="serve", metadata=field_help(
        "Comma-separated tags of the MetaGraph each worker loads from a SavedModel."))
    enable_model_warmup: bool = field(default=True, metadata=field_help(
        "Run each version's assets.extra/tf_serving_warmup_requests before it takes requests."))
    num_request_iterations_for_warmup: int = field(default=1, metadata=field_help(
        "Times each warm-up record runs."))
    prefer_tflite_model: bool = field(default=False, metadata={**field_help(
        "Serve a version directory's model.tflite (when it has one, even beside a SavedModel) with TensorFlow "
        "Lite's interpreter, as TF Serving does; --use_tflite_model is its older name."),
        "aliases": ("use_tflite_model",)})
    per_process_gpu_memory_fraction: float = field(default=0.0, metadata=field_help(
        "Each model worker's share of its GPU's memory, 0 to 1, taken at start (TF Serving's per-process "
        "fraction: here every model version on a card is a process of its own, so the versions sharing a "
        "card, counting both during a version swap, need their fractions to sum to 1 at most); 0: grow as "
        "needed."))
    mixed_precision: str = field(default="", metadata=field_help(
        "bfloat16: TensorFlow's oneDNN bfloat16 auto mixed precision in the workers (TF Serving's one "
        "mode); empty: none."))

    def __post_init__(self) -> None:
        for name in ("tensorflow_intra_op_parallelism", "tensorflow_session_parallelism"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.tensorflow_inter_op_parallelism < -1:  # -1: TensorFlow runs each op in the caller's thread
            raise ConfigError(f"tensorflow_inter_op_parallelism must be -1 or more, got "
                              f"{self.tensorflow_inter_op_parallelism}")
        if self.num_request_iterations_for_warmup < 1:
            raise ConfigError(f"num_request_iterations_for_warmup must be >= 1, got "
                              f"{self.num_request_iterations_for_warmup}")
        if not all(self.saved_model_tags.split(",")):
            raise ConfigError(f"saved_model_tags must be comma-separated tags, got {self.saved_model_tags!r}")
        if not 0.0 <= self.per_process_gpu_memory_fraction <= 1.0:
            raise ConfigError(f"per_process_gpu_memory_fraction must be 0 to 1, got "
                              f"{self.per_process_gpu_memory_fraction}")
        if self.mixed_precision not in ("", "bfloat16"):
            raise ConfigError(f"mixed_precision must be bfloat16 or empty (TF Serving's one mode), got "
                              f"{self.mixed_precision!r}")

    @property
    def intra_op_threads(self) -> int:
        """A worker's intra-op threads: its flag, else --tensorflow_session_parallelism (TF Serving's rule)."""
        return self.tensorflow_intra_op_parallelism or self.tensorflow_session_parallelism

    @property
    def inter_op_threads(self) -> int:
        return self.tensorflow_inter_op_parallelism or self.tensorflow_session_parallelism


# --- the configuration of each child the broker starts (python -m workers / -m iobatcher) ---

@dataclass(frozen=True, kw_only=True, slots=True)
class ChildConfig:
    """What every child on the backend socket takes (tfbroker/runtime/backend_peer.py)."""

    backend_address: str = field(metadata=field_help("The broker's backend ZeroMQ address."))
    heartbeat_interval_s: float = field(default=DEFAULT_HEARTBEAT_INTERVAL_S, metadata=field_help(
        "Seconds between heartbeats."))
    heartbeat_liveness: int = field(default=DEFAULT_HEARTBEAT_LIVENESS, metadata=field_help(
        "Missed intervals before the broker is taken for gone (a worker reconnects, an I/O batcher exits)."))
    log_level: str = field(default="info", metadata=field_help("debug, info, warning or error."))

    def __post_init__(self) -> None:
        if self.heartbeat_interval_s <= 0:
            raise ConfigError(f"heartbeat_interval_s must be > 0, got {self.heartbeat_interval_s}")
        if self.heartbeat_liveness < 2:
            raise ConfigError(f"heartbeat_liveness must be >= 2, got {self.heartbeat_liveness}")


@dataclass(frozen=True, kw_only=True, slots=True)
class WorkerConfig(ChildConfig):
    model_name: str = field(metadata=field_help("Model served by this worker."))
    version: int = field(metadata=field_help("Version number served by this worker."))
    path: str = field(metadata=field_help("The version's SavedModel directory."))
    warmup_batch_sizes: tuple[int, ...] = field(default=(1,), metadata=field_help(
        "Batch sizes each signature runs once before READY."))
    device: str = field(default="", metadata=field_help(
        "The device of this replica (gpuN, cpuN), in its title; empty when the CPU is the only one. "
        "The broker makes it the only one visible (CUDA_VISIBLE_DEVICES)."))
    tensorflow: TensorFlowOptions = field(default=TensorFlowOptions(), metadata=field_help(
        "Flags of TensorFlowOptions."))

    @property
    def title(self) -> str:
        """``worker:MODEL:VERSION``, with ``:DEVICE`` when there are replicas or GPUs."""
        return f"worker:{self.model_name}:{self.version}" + (f":{self.device}" if self.device else "")

    def __post_init__(self) -> None:
        ChildConfig.__post_init__(self)  # (zero-argument super() fails in a slots dataclass)
        if self.version < 0:
            raise ConfigError(f"version must be >= 0, got {self.version}")


@dataclass(frozen=True, kw_only=True, slots=True)
class IoBatcherConfig(ChildConfig):
    index: int = field(metadata=field_help("Which of the broker's I/O batchers this is (0-based)."))
    redis_timeout_ms: int = field(default=1000, metadata=field_help(
        "Longest wait on a Redis table for one batch."))

    def __post_init__(self) -> None:
        ChildConfig.__post_init__(self)
        if self.index < 0:
            raise ConfigError(f"index must be >= 0, got {self.index}")
        if self.redis_timeout_ms < 1:
            raise ConfigError(f"redis_timeout_ms must be >= 1, got {self.redis_timeout_ms}")
