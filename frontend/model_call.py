"""A ModelCall: one broker call, as every API asks it (frontend/pipeline.py runs it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# What a ModelCall may ask of the broker.
PREDICT, CLASSIFY, REGRESS, METADATA, STATUS, RELOAD = "predict", "classify", "regress", "metadata", "status", "reload"
REPOSITORY = "repository"  # the model repository extension: inputs (op, ready_only)
MODEL_RUNS = frozenset({PREDICT, CLASSIFY, REGRESS})  # the calls that run a model (their stages are timed)


@dataclass(slots=True)
class ModelCall:
    """One broker call, as every API asks it."""

    verb: str  # PREDICT, CLASSIFY, REGRESS (inputs), METADATA, STATUS, RELOAD (inputs: the config text), REPOSITORY
    model: str = ""
    version: int | None = None
    label: str | None = None
    signature_name: str = "serving_default"
    inputs: Any = None  # {name: array or RawTensor}; serialized tf.Examples; a config
    exact_dtypes: bool = False  # gRPC: each tensor must have its input's dtype
    timeout_s: float | None = None  # the deadline the caller asks for; None: the server's
    answer_as: Any = None  # what the adapter's ``answer`` needs of its request (a form, outputs asked for)
    trace: str | None = None  # the traceparent of this call's span, when traced
