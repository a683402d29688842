"""What the tuner varies: TF Serving's batching parameters and tfbroker's own flags."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True, order=True)
class Setting:
    max_batch_size: int
    batch_timeout_micros: int
    batches_in_flight: int
    frontends: int
    # TF Serving's --tensorflow_intra_op_parallelism and --tensorflow_inter_op_parallelism (0: TensorFlow's choice)
    intra_op_threads: int = 0
    inter_op_threads: int = 0

    def batching_parameters(self) -> str:
        """The BatchingParameters file (TF Serving's text format) of this setting."""
        return (f"max_batch_size {{ value: {self.max_batch_size} }}\n"
                f"batch_timeout_micros {{ value: {self.batch_timeout_micros} }}\n"
                "max_enqueued_batches { value: 100 }\n")

    def broker_flags(self) -> list[str]:
        """The broker's own flags of this setting (the batching file aside)."""
        threads = [f"--tensorflow_intra_op_parallelism={self.intra_op_threads}",
                   f"--tensorflow_inter_op_parallelism={self.inter_op_threads}"] \
            if (self.intra_op_threads, self.inter_op_threads) != (0, 0) else []
        return [f"--batches_in_flight={self.batches_in_flight}", f"--frontends={self.frontends}", *threads]

    def flags(self) -> str:
        return " ".join(["--enable_batching", "--batching_parameters_file=batching.pbtxt", *self.broker_flags()])

    def label(self) -> str:
        threads = f", TF threads {self.intra_op_threads}/{self.inter_op_threads}" \
            if (self.intra_op_threads, self.inter_op_threads) != (0, 0) else ""
        return (f"max_batch_size {self.max_batch_size}, timeout {self.batch_timeout_micros} µs, "
                f"{self.batches_in_flight} in flight, {self.frontends} frontend{'s' if self.frontends != 1 else ''}"
                f"{threads}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
