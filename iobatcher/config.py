"""The I/O batcher's configuration, passed by the broker as flags (broker/flags.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from broker.config import DEFAULT_HEARTBEAT_INTERVAL_S, DEFAULT_HEARTBEAT_LIVENESS


@dataclass(frozen=True, kw_only=True, slots=True)
class IoBatcherConfig:
    index: int = field(metadata={"help": "Which of the broker's I/O batchers this is (0-based)."})
    backend_address: str = field(metadata={"help": "The broker's backend ZeroMQ address."})
    heartbeat_interval_s: float = field(default=DEFAULT_HEARTBEAT_INTERVAL_S, metadata={
        "help": "Seconds between heartbeats."})
    heartbeat_liveness: int = field(default=DEFAULT_HEARTBEAT_LIVENESS, metadata={
        "help": "Missed intervals before the broker is taken for gone and the I/O batcher exits."})
    redis_timeout_ms: int = field(default=1000, metadata={
        "help": "Longest wait on a Redis table for one batch."})
    log_level: str = field(default="info", metadata={"help": "debug, info, warning or error."})

    def __post_init__(self) -> None:
        if self.index < 0:
            raise ValueError(f"index must be >= 0, got {self.index}")
        if self.heartbeat_interval_s <= 0:
            raise ValueError(f"heartbeat_interval_s must be > 0, got {self.heartbeat_interval_s}")
        if self.redis_timeout_ms < 1:
            raise ValueError(f"redis_timeout_ms must be >= 1, got {self.redis_timeout_ms}")
