"""Warm-up before READY: TF Serving's warm-up file when the model ships one, then every batch size.

TF Serving's format: ``VERSION_DIR/assets.extra/tf_serving_warmup_requests``, a TFRecord
file of ``PredictionLog`` protos, at most 1000 records. Each record runs once; a record that
fails fails the load (the broker keeps the old version serving), as in TF Serving.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import tensorflow as tf

from tfbroker.wire.protocol import STRING
from workers.model import LoadedModel

log = logging.getLogger("tfbroker.worker")

WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")
MAX_WARMUP_RECORDS = 1000


class WarmupError(ValueError):
    pass


def warm_up_from_file(model: LoadedModel, iterations: int = 1) -> int:
    """Run the requests of the model's warm-up file, if it has one, each ``iterations`` times
    (TF Serving's --num_request_iterations_for_warmup); the number of records."""
    path = os.path.join(model.path, WARMUP_FILE)
    if not os.path.isfile(path):
        return 0
    from tensorflow_serving.apis import prediction_log_pb2

    count = 0
    try:
        for record in tf.data.TFRecordDataset(path).take(MAX_WARMUP_RECORDS + 1):
            count += 1
            if count > MAX_WARMUP_RECORDS:
                raise WarmupError(f"{path} holds more than {MAX_WARMUP_RECORDS} records")
            entry = prediction_log_pb2.PredictionLog.FromString(record.numpy())
            signature_name, inputs = _request_of(entry)
            signature = model.signatures.get(signature_name)
            if signature is None:
                raise WarmupError(f"record {count} asks for signature {signature_name!r}, which the model lacks")
            for _ in range(iterations):
                signature.run(inputs)
    except tf.errors.OpError as exc:
        raise WarmupError(f"cannot read warm-up file {path}: {exc.message}") from exc
    except WarmupError:
        raise
    except Exception as exc:  # noqa: BLE001 - the model's own errors, in its own types
        raise WarmupError(f"warm-up request {count} of {path} failed: {exc}") from exc
    return count


def warm_up_batch_sizes(model: LoadedModel, batch_sizes: tuple[int, ...]) -> None:
    """Run every numeric signature once per batch size, so the first request is not slow."""
    for signature in model.signatures.values():
        if any(info.dtype == STRING for info in signature.inputs.values()):
            continue  # parsing signatures need real examples; the warm-up file covers them
        for size in batch_sizes:
            inputs = {name: np.zeros(_warmup_shape(info.shape, size), dtype=info.dtype)
                      for name, info in signature.inputs.items()}
            try:
                signature.run(inputs)
            except Exception as exc:  # noqa: BLE001 - best effort: shapes are guessed
                log.debug("warm-up of %s at batch %d failed: %s", signature.name, size, exc)


# --- implementation ---

def _request_of(entry: Any) -> tuple[str, dict[str, np.ndarray]]:
    """(signature name, inputs) of one PredictionLog."""
    kind = entry.WhichOneof("log_type")
    if kind == "predict_log":
        request = entry.predict_log.request
        return (request.model_spec.signature_name or "serving_default",
                {name: tf.make_ndarray(proto) for name, proto in request.inputs.items()})
    if kind in ("classify_log", "regress_log"):
        request = getattr(entry, kind).request
        if request.input.WhichOneof("kind") != "example_list":
            raise WarmupError(f"{kind} warm-up records need an example_list input")
        examples = [e.SerializeToString() for e in request.input.example_list.examples]
        return (request.model_spec.signature_name or "serving_default",
                {"inputs": np.array(examples, dtype=object)})
    raise WarmupError(f"warm-up records of kind {kind!r} are not supported")


def _warmup_shape(shape: tuple[int, ...] | None, size: int) -> tuple[int, ...]:
    if shape is None:
        return (size,)
    if not shape:
        return ()
    first = size if shape[0] == -1 else shape[0]
    return (first, *(1 if d == -1 else d for d in shape[1:]))
