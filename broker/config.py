"""Configuration as plain frozen dataclasses, with TF Serving's names where it has one.

Each field is documented once, in its ``help`` metadata: the command line (tfbroker/runtime/flags.py)
is generated from these classes, so a setting is spelled in one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tfbroker.runtime.settings import (DEFAULT_HEARTBEAT_INTERVAL_S, DEFAULT_HEARTBEAT_LIVENESS, DEFAULT_REQUEST_LOG_FILE_BYTES,
                                       DEFAULT_TIMEOUT_MS,
                                       GrpcOptions, RequestLimits, TensorFlowOptions, default_runtime_dir, ipc_address,
                                       local_address)
from tfbroker.runtime.settings import field_help as _help
from tfbroker.wire.errors import ConfigError


@dataclass(frozen=True, kw_only=True, slots=True)
class BatchingParameters:
    """TF Serving's BatchingParameters; defaults tuned for online serving.

    A batch closes when it holds ``max_batch_size`` rows or when its first request has
    waited ``batch_timeout_micros``. A worker with nothing in flight takes whatever is
    queued at once, so a lone request never waits for a batch to fill; batches form from
    what piles up while the worker is busy.
    """

    max_batch_size: int = field(default=64, metadata=_help(
        "Largest batch, in rows, handed to the model; a larger request gets HTTP 400."))
    batch_timeout_micros: int = field(default=1000, metadata=_help(
        "Close an underfull batch once its first request has waited this long."))
    max_enqueued_batches: int = field(default=100, metadata=_help(
        "Queue bound in batches per (model, version, signature); overflow gets HTTP 503."))
    allowed_batch_sizes: tuple[int, ...] = field(default=(), metadata=_help(
        "Pad each batch up to the next of these sizes; increasing, last == max_batch_size."))
    num_batch_threads: int = field(default=1, metadata=_help(
        "Accepted for TF Serving's files; one worker process per model runs the batches."))
    pad_variable_length_inputs: bool = field(default=False, metadata=_help(
        "Accepted for TF Serving's files; not supported (requests must share inner shapes)."))

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ConfigError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.batch_timeout_micros < 0:
            raise ConfigError(f"batch_timeout_micros must be >= 0, got {self.batch_timeout_micros}")
        if self.max_enqueued_batches < 1:
            raise ConfigError(f"max_enqueued_batches must be >= 1, got {self.max_enqueued_batches}")
        sizes = self.allowed_batch_sizes
        if sizes:
            if any(b <= a for a, b in zip(sizes, sizes[1:])) or sizes[0] < 1:
                raise ConfigError(f"allowed_batch_sizes must be positive and increasing, got {list(sizes)}")
            if sizes[-1] != self.max_batch_size:
                raise ConfigError(
                    f"allowed_batch_sizes must end with max_batch_size ({self.max_batch_size}), "
                    f"got {list(sizes)}")

    def padded_size(self, rows: int) -> int:
        """The batch size the model runs for ``rows`` rows: the next allowed size, if any."""
        for size in self.allowed_batch_sizes:
            if size >= rows:
                return size
        return rows


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelVersionPolicy:
    """TF Serving's model_version_policy: which version directories to serve."""

    # "latest" (the newest num_versions), "all", or "specific" (those in versions).
    kind: str = "latest"
    num_versions: int = 1
    versions: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in ("latest", "all", "specific"):
            raise ConfigError(f"model_version_policy must be latest, all or specific, got {self.kind!r}")
        if self.kind == "latest" and self.num_versions < 1:
            raise ConfigError(f"model_version_policy latest needs num_versions >= 1, got {self.num_versions}")
        if self.kind == "specific" and not self.versions:
            raise ConfigError("model_version_policy specific needs at least one version")


@dataclass(frozen=True, kw_only=True, slots=True)
class RequestLogging:
    """TF Serving's ``logging_config`` of a model: a sampled copy of its successful predict
    requests and answers, as PredictionLog records in TFRecord files whose names start with
    ``filename_prefix``, written by the frontends (frontend/request_log.py)."""

    sampling_rate: float
    filename_prefix: str
    collector: str = "tfrecord"  # log_collector_config.type: "" is taken to mean the same

    def __post_init__(self) -> None:
        if not 0.0 <= self.sampling_rate <= 1.0:
            raise ConfigError(f"logging_config sampling_rate must be between 0 and 1, got {self.sampling_rate}")
        if self.collector not in ("", "tfrecord"):
            raise ConfigError(f"log_collector_config type {self.collector!r}: tfbroker writes TFRecord files "
                              "of PredictionLog records (type \"tfrecord\", or \"\")")
        if self.sampling_rate > 0 and not self.filename_prefix:
            raise ConfigError("logging_config needs log_collector_config { filename_prefix } to write to")


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelConfig:
    """One entry of TF Serving's model_config_list."""

    name: str
    base_path: str
    model_platform: str = "tensorflow"
    model_version_policy: ModelVersionPolicy = ModelVersionPolicy()
    # label -> version; a label only ever points at an AVAILABLE version (TF Serving's rule).
    version_labels: tuple[tuple[str, int], ...] = ()
    logging: RequestLogging | None = None  # its logging_config, if any

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or ":" in self.name:
            raise ConfigError(f"model name must be non-empty without '/' or ':', got {self.name!r}")
        if self.model_platform != "tensorflow":
            raise ConfigError(f"model {self.name}: model_platform {self.model_platform!r} is not supported")
        for label, _ in self.version_labels:
            if not label or label.isdigit() or "/" in label or ":" in label:
                raise ConfigError(f"model {self.name}: version label {label!r} must be a non-numeric word")


# --version_swap_policy values (broker/versions.py).
AVAILABILITY_PRESERVING = "availability_preserving"
RESOURCE_PRESERVING = "resource_preserving"
SWAP_POLICIES = (AVAILABILITY_PRESERVING, RESOURCE_PRESERVING)

@dataclass(frozen=True, kw_only=True, slots=True)
class LookupBatching:
    """The I/O batchers' own batching (TF Serving's parameters, for the lookup stage): one
    queue per model version, whatever the signature. A batch's lookups run as one vectorised
    step per table (and one Redis MGET), each distinct key once."""

    lookup_max_batch_size: int = field(default=512, metadata=_help(
        "Largest lookup batch, in rows of the requests it holds."))
    lookup_batch_timeout_micros: int = field(default=500, metadata=_help(
        "Close an underfull lookup batch once its first request has waited this long (an idle I/O "
        "batcher takes it at once)."))
    lookup_max_enqueued_batches: int = field(default=100, metadata=_help(
        "Lookup batches queued per model version; beyond it HTTP 503."))

    def __post_init__(self) -> None:
        try:
            self.parameters()  # the same checks as the model's batching
        except ValueError as exc:
            raise ConfigError(f"lookup_{exc}") from exc

    def parameters(self) -> BatchingParameters:
        return BatchingParameters(max_batch_size=self.lookup_max_batch_size,
                                  batch_timeout_micros=self.lookup_batch_timeout_micros,
                                  max_enqueued_batches=self.lookup_max_enqueued_batches)


@dataclass(frozen=True, kw_only=True, slots=True)
class ServerConfig:
    """What ``python -m broker`` runs: TF Serving's flags first, then ours."""

    model_name: str = field(default="", metadata=_help(
        "Name of the single model to serve (with --model_base_path)."))
    model_base_path: str = field(default="", metadata=_help(
        "Directory holding numeric version subdirectories of one SavedModel."))
    model_config_file: str = field(default="", metadata=_help(
        "TF Serving text-protobuf ModelServerConfig (model_config_list) for several models."))
    rest_api_port: int = field(default=8501, metadata=_help(
        "HTTP port of the REST API served by the frontends."))
    rest_api_timeout_in_ms: int = field(default=DEFAULT_TIMEOUT_MS, metadata=_help(
        "Deadline of a request; past it the answer is HTTP 504. A caller may ask for less "
        "(HTTP header X-Request-Timeout-Ms, the client's timeout_s)."))
    enable_batching: bool = field(default=True, metadata=_help(
        "Batch requests per (model, version, signature); false runs each request alone."))
    batching_parameters_file: str = field(default="", metadata=_help(
        "TF Serving text-protobuf BatchingParameters; unset fields keep our defaults."))
    file_system_poll_wait_seconds: float = field(default=1.0, metadata=_help(
        "Seconds between scans of each model's base path for new version directories; "
        "0 scans once at start-up, a negative value never."))
    model_config_file_poll_wait_seconds: float = field(default=0.0, metadata=_help(
        "Seconds between re-reads of --model_config_file (models added, removed, relabelled); "
        "0 never (use `python -m broker.ctl reload-config`)."))
    monitoring_config_file: str = field(default="", metadata=_help(
        "TF Serving text-protobuf MonitoringConfig; prometheus_config { enable: true } serves Prometheus "
        "metrics on the REST port (path default /monitoring/prometheus/metrics)."))
    request_log_max_file_bytes: int = field(default=DEFAULT_REQUEST_LOG_FILE_BYTES, metadata=_help(
        "Request logs (a model's logging_config in --model_config_file): each frontend starts its next "
        "TFRecord file once its current one has this many bytes."))
    otel_traces_endpoint: str = field(default="", metadata=_help(
        "OpenTelemetry traces: the OTLP/HTTP endpoint (http://collector:4318/v1/traces) that every tfbroker "
        "process exports its spans to. Sets OTEL_EXPORTER_OTLP_TRACES_ENDPOINT for the broker and its "
        "children; the standard OTEL_* variables work as well. Off when neither is set."))
    otel_traces_sampling_rate: float = field(default=-1.0, metadata=_help(
        "The share of requests traced (0 to 1), sampled in the frontend unless the caller's traceparent "
        "says: sets OTEL_TRACES_SAMPLER=parentbased_traceidratio. Default (-1): the SDK's (OTEL_TRACES_SAMPLER, "
        "else every request)."))
    enable_status_page: bool = field(default=True, metadata=_help(
        "Serve the status page (GET /status, and its figures at /status.json) on the REST port: each "
        "model's versions, replicas, queues, batch sizes, request rates and latency, errors, I/O batchers "
        "and the last version swaps, refreshed in the browser."))
    tensorflow: TensorFlowOptions = field(default=TensorFlowOptions(), metadata=_help(
        "Flags of TensorFlowOptions: how each worker runs TensorFlow."))
    rest_api_num_threads: int = field(default=0, metadata=_help(
        "Accepted for TF Serving's command lines: HTTP concurrency here is --frontends event loops."))
    rest_api_enable_cors_support: bool = field(default=False, metadata=_help(
        "Accepted for TF Serving's command lines: CORS preflights are always answered (with an Origin "
        "header: 200; without: 400)."))
    max_num_load_retries: int = field(default=0, metadata=_help(
        "Times a version whose load fails is tried again before it ends with the error (TF Serving's "
        "default is 5; a failed load is usually a bad model, so none here)."))
    load_retry_interval_micros: int = field(default=60_000_000, metadata=_help(
        "Wait before each load retry."))
    enable_per_model_batching_parameters: bool = field(default=False, metadata=_help(
        "A version directory's batching_params.pbtxt (TF Serving's BatchingParameters) sets that "
        "version's batching in place of --batching_parameters_file."))
    enable_signature_method_name_check: bool = field(default=False, metadata=_help(
        "Predict only signatures whose method_name is tensorflow/serving/predict (classify and regress "
        "always check theirs)."))
    # TF Serving's flags taken so its command lines start, with no effect here (docs/flags.md says why).
    num_load_threads: int = field(default=0, metadata=_help(
        "No effect: every version loads in a process of its own, all at once."))
    num_unload_threads: int = field(default=0, metadata=_help(
        "No effect: every version unloads in a process of its own, all at once."))
    flush_filesystem_caches: bool = field(default=True, metadata=_help(
        "No effect: the workers leave the page cache to the kernel."))
    enable_profiler: bool = field(default=True, metadata=_help(
        "No effect: there is no profiler service on the gRPC port."))
    skip_initialize_tpu: bool = field(default=False, metadata=_help("No effect: TPUs are not served."))
    remove_unused_fields_from_bundle_metagraph: bool = field(default=True, metadata=_help(
        "No effect: the worker keeps what its loader keeps."))
    allow_version_labels_for_unavailable_models: bool = field(default=False, metadata=_help(
        "No effect: a label always waits for its version to be AVAILABLE, never refused."))
    num_tflite_pools: int = field(default=1, metadata=_help(
        "No effect: a TensorFlow Lite worker runs one interpreter, one batch at a time."))
    num_tflite_interpreters_per_pool: int = field(default=1, metadata=_help(
        "No effect: a TensorFlow Lite worker runs one interpreter, one batch at a time."))
    xla_cpu_compilation_enabled: bool = field(default=False, metadata=_help(
        "No effect: TensorFlow compiles a model's jit_compile functions with XLA whatever it says."))
    xla_gpu_compilation_enabled: bool = field(default=False, metadata=_help(
        "No effect: TensorFlow compiles a model's jit_compile functions with XLA whatever it says."))
    # TF Serving's flags refused when given (exit 2), each with the reason and what to use instead.
    platform_config_file: str = field(default="", metadata=_help(
        "Refused: tfbroker serves the TensorFlow platform only; set its batching with "
        "--batching_parameters_file and its threads with the tensorflow_* flags."))
    tensorflow_session_config_file: str = field(default="", metadata=_help(
        "Refused: set what a Session ConfigProto would with --tensorflow_intra_op_parallelism, "
        "--tensorflow_inter_op_parallelism and --per_process_gpu_memory_fraction."))
    thread_pool_factory_config_file: str = field(default="", metadata=_help(
        "Refused: the workers use TensorFlow's own thread pools (--tensorflow_*_parallelism)."))
    # --- ours ---
    enable_model_control: bool = field(default=False, metadata=_help(
        "Let clients load and unload models with the Open Inference Protocol's model repository extension "
        "(Triton's --model-control-mode=explicit); off, they may list it only, and python -m broker.ctl "
        "alone loads and unloads."))
    frontends: int = field(default=2, metadata=_help(
        "HTTP frontend processes to run; 0 runs none (start them under gunicorn instead)."))
    rest_api_host: str = field(default="0.0.0.0", metadata=_help(
        "Address the frontends listen on."))
    runtime_dir: str = field(default="", metadata=_help(
        "Directory for the ipc:// sockets and the lock file (default: $XDG_RUNTIME_DIR/tfbroker-UID-PORT, "
        "PORT being --rest_api_port, or the same under /tmp)."))
    frontend_address: str = field(default="", metadata=_help(
        "ZeroMQ address frontends and clients connect to (default: ipc://RUNTIME_DIR/frontend.sock; "
        "tcp://HOST:PORT for frontends on other hosts, which needs CURVE unless HOST is loopback)."))
    backend_address: str = field(default="", metadata=_help(
        "ZeroMQ address workers connect to (default: ipc://RUNTIME_DIR/backend.sock)."))
    control_address: str = field(default="", metadata=_help(
        "ZeroMQ address of the control socket for `python -m broker.ctl` (default: "
        "ipc://RUNTIME_DIR/control.sock)."))
    curve_secret_key_file: str = field(default="", metadata=_help(
        "The broker's CURVE certificate with its secret key (python -m broker.ctl keygen): every socket "
        "then requires CURVE, and TCP addresses beyond loopback are allowed."))
    curve_client_keys_dir: str = field(default="", metadata=_help(
        "Directory of the public certificates (*.key) of the clients allowed in, with CURVE."))
    version_swap_policy: str = field(default=AVAILABILITY_PRESERVING, metadata=_help(
        "availability_preserving: load the new version next to the old one, then switch (two copies "
        "during a swap); resource_preserving: unload the old one first (briefly unavailable)."))
    devices: str = field(default="", metadata=_help(
        "Where model workers run: one worker per model version per device. Empty: every visible GPU "
        "(CUDA_VISIBLE_DEVICES, else the NVIDIA driver's list), or the CPU when there is none; or a comma list "
        "of gpuN and cpu (cpu,cpu: two CPU replicas). Each batch goes to the least loaded replica."))
    batches_in_flight: int = field(default=2, metadata=_help(
        "Batches handed to a worker before it answers, so the device never waits on Python."))
    heartbeat_interval_s: float = field(default=DEFAULT_HEARTBEAT_INTERVAL_S, metadata=_help(
        "Seconds between heartbeats when a peer has sent nothing else."))
    heartbeat_liveness: int = field(default=DEFAULT_HEARTBEAT_LIVENESS, metadata=_help(
        "Missed intervals before a peer is dead. interval x liveness must exceed the slowest batch."))
    worker_start: str = field(default="zygote", metadata=_help(
        "How a model worker starts: zygote (forked from one process that imported TensorFlow once: a new "
        "version serves in under a second, and each costs its model's memory only) or spawn (a fresh "
        "interpreter each: for a model whose Python code is not safe to fork, such as one that starts threads "
        "or opens a device when imported)."))
    kill_grace_s: float = field(default=3.0, metadata=_help(
        "A child told to stop (SIGTERM: a hung worker, an unload) that is still there this long after "
        "gets SIGKILL; a hung worker writes its Python traceback to the log first."))
    worker_load_timeout_s: float = field(default=600.0, metadata=_help(
        "Longest a worker may take to load and warm up its model before it is killed."))
    shutdown_grace_s: float = field(default=10.0, metadata=_help(
        "On SIGTERM, how long children get to finish before SIGKILL."))
    demo_models_dir: str = field(default="", metadata=_help(
        "Where the demo models are made when no model is named (default: ~/.cache/tfbroker/demo_models)."))
    log_level: str = field(default="info", metadata=_help("debug, info, warning or error."))
    log_format: str = field(default="text", metadata=_help(
        "text (one line per event) or json (one JSON object per line, for log collectors); every process."))
    verbose: bool = field(default=False, metadata=_help(
        "Show TensorFlow's own start-up and info logs from the workers (kept out by default)."))
    limits: RequestLimits = field(default=RequestLimits(), metadata=_help("Flags of RequestLimits."))
    grpc: GrpcOptions = field(default=GrpcOptions(), metadata=_help("Flags of GrpcOptions."))
    iobatchers: int = field(default=1, metadata=_help(
        "I/O batcher processes, started when a version declares lookups (assets.extra/lookups.json); more "
        "give lookups more CPU (memory-mapped tables are shared through the page cache)."))
    lookup_redis_timeout_ms: int = field(default=1000, metadata=_help(
        "Longest an I/O batcher waits on a Redis table for one batch; past it the batch's requests get 503."))
    lookup_batching: LookupBatching = field(default=LookupBatching(), metadata=_help("Flags of LookupBatching."))

    def __post_init__(self) -> None:
        if self.model_config_file and (self.model_name or self.model_base_path):
            raise ConfigError("use either --model_config_file or --model_name/--model_base_path, not both")
        if bool(self.model_name) != bool(self.model_base_path):
            raise ConfigError("--model_name and --model_base_path go together")
        if self.frontends < 0:
            raise ConfigError(f"frontends must be >= 0, got {self.frontends}")
        if not 0 <= self.rest_api_port < 65536:
            raise ConfigError(f"rest_api_port must be 0..65535, got {self.rest_api_port}")
        if self.rest_api_timeout_in_ms <= 0:
            raise ConfigError(f"rest_api_timeout_in_ms must be > 0, got {self.rest_api_timeout_in_ms}")
        if self.batches_in_flight < 1:
            raise ConfigError(f"batches_in_flight must be >= 1, got {self.batches_in_flight}")
        if self.heartbeat_interval_s <= 0 or self.heartbeat_liveness < 2:
            raise ConfigError("heartbeat_interval_s must be > 0 and heartbeat_liveness >= 2")
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"log_format must be text or json, got {self.log_format!r}")
        if self.version_swap_policy not in SWAP_POLICIES:
            raise ConfigError("version_swap_policy must be availability_preserving or resource_preserving, "
                             f"got {self.version_swap_policy!r}")
        if self.model_config_file_poll_wait_seconds and not self.model_config_file:
            raise ConfigError("--model_config_file_poll_wait_seconds needs --model_config_file")
        if not self.curve_secret_key_file:
            for name, address in (("frontend_address", self.resolved_frontend_address),
                                  ("backend_address", self.resolved_backend_address),
                                  ("control_address", self.resolved_control_address)):
                if not local_address(address):
                    raise ConfigError(f"{name} {address} is reachable from other hosts: set --curve_secret_key_file "
                                     "(and --curve_client_keys_dir), or use ipc:// or a loopback address")
        if self.curve_client_keys_dir and not self.curve_secret_key_file:
            raise ConfigError("--curve_client_keys_dir needs --curve_secret_key_file")
        if self.otel_traces_sampling_rate != -1.0 and not 0.0 <= self.otel_traces_sampling_rate <= 1.0:
            raise ConfigError(f"otel_traces_sampling_rate must be between 0 and 1, got {self.otel_traces_sampling_rate}")
        if self.worker_start not in ("zygote", "spawn"):
            raise ConfigError(f"worker_start must be zygote or spawn, got {self.worker_start!r}")
        if self.kill_grace_s <= 0:
            raise ConfigError(f"kill_grace_s must be > 0, got {self.kill_grace_s}")
        if self.max_num_load_retries < 0 or self.load_retry_interval_micros < 0:
            raise ConfigError("max_num_load_retries and load_retry_interval_micros must be >= 0")
        if self.iobatchers < 1:
            raise ConfigError(f"iobatchers must be >= 1, got {self.iobatchers}")
        if self.lookup_redis_timeout_ms < 1:
            raise ConfigError(f"lookup_redis_timeout_ms must be >= 1, got {self.lookup_redis_timeout_ms}")
        for name in ("platform_config_file", "tensorflow_session_config_file", "thread_pool_factory_config_file"):
            if getattr(self, name):
                reason = str(ServerConfig.__dataclass_fields__[name].metadata["help"]).removeprefix("Refused: ")
                raise ConfigError(f"--{name} is not supported: {reason}")

    @property
    def resolved_runtime_dir(self) -> str:
        return self.runtime_dir or default_runtime_dir(self.rest_api_port)

    @property
    def resolved_frontend_address(self) -> str:
        return self.frontend_address or ipc_address(self.resolved_runtime_dir, "frontend.sock")

    @property
    def resolved_backend_address(self) -> str:
        return self.backend_address or ipc_address(self.resolved_runtime_dir, "backend.sock")

    @property
    def resolved_control_address(self) -> str:
        return self.control_address or ipc_address(self.resolved_runtime_dir, "control.sock")

    @property
    def heartbeat_expiry_s(self) -> float:
        return self.heartbeat_interval_s * self.heartbeat_liveness
