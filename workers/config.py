"""The model worker's configuration, passed by the broker as flags (broker/flags.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from broker.config import DEFAULT_HEARTBEAT_INTERVAL_S, DEFAULT_HEARTBEAT_LIVENESS


@dataclass(frozen=True, kw_only=True, slots=True)
class WorkerConfig:
    model_name: str = field(metadata={"help": "Model served by this worker."})
    version: int = field(metadata={"help": "Version number served by this worker."})
    path: str = field(metadata={"help": "The version's SavedModel directory."})
    backend_address: str = field(metadata={"help": "The broker's backend ZeroMQ address."})
    heartbeat_interval_s: float = field(default=DEFAULT_HEARTBEAT_INTERVAL_S, metadata={
        "help": "Seconds between heartbeats."})
    heartbeat_liveness: int = field(default=DEFAULT_HEARTBEAT_LIVENESS, metadata={
        "help": "Missed intervals before the broker is taken for gone and the worker reconnects."})
    warmup_batch_sizes: tuple[int, ...] = field(default=(1,), metadata={
        "help": "Batch sizes each signature runs once before READY."})
    tensorflow_intra_op_parallelism: int = field(default=0, metadata={
        "help": "Threads for one TensorFlow op (0: TensorFlow's choice)."})
    tensorflow_inter_op_parallelism: int = field(default=0, metadata={
        "help": "TensorFlow ops run at once (0: TensorFlow's choice)."})
    log_level: str = field(default="info", metadata={"help": "debug, info, warning or error."})
    device: str = field(default="", metadata={
        "help": "The device of this replica (gpuN, cpuN), in its title; empty when the CPU is the only one. "
                "The broker makes it the only one visible (CUDA_VISIBLE_DEVICES)."})

    @property
    def title(self) -> str:
        """``worker:MODEL:VERSION``, with ``:DEVICE`` when there are replicas or GPUs."""
        return f"worker:{self.model_name}:{self.version}" + (f":{self.device}" if self.device else "")

    def __post_init__(self) -> None:
        if self.version < 0:
            raise ValueError(f"version must be >= 0, got {self.version}")
        if self.heartbeat_interval_s <= 0:
            raise ValueError(f"heartbeat_interval_s must be > 0, got {self.heartbeat_interval_s}")
