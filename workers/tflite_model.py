"""A TensorFlow Lite model (``model.tflite`` in a version directory) served as TF Serving
serves one with ``--prefer_tflite_model``: its signatures are the model's signatures, and
each batch resizes the interpreter's inputs to the batch's rows.

The interpreter checks nothing about what it is fed (a wrong inner dimension reads past the
tensor), so the broker's admission check against these signatures is what keeps it safe.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np
import tensorflow as tf

from tfbroker.wire.errors import InvalidArgument
from tfbroker.wire.tensors import TF_NAMES
from workers.model import PREDICT_METHOD, TFLITE_FILE, LoadedModel, Signature, TensorInfo


def load_tflite(path: str, num_threads: int = 0) -> LoadedModel:
    """The interpreter of ``path/model.tflite``, one Signature per signature it has."""
    with warnings.catch_warnings():  # tf.lite.Interpreter says it moves to ai_edge_litert; it still serves
        warnings.simplefilter("ignore")
        interpreter = tf.lite.Interpreter(model_path=os.path.join(path, TFLITE_FILE),
                                          num_threads=num_threads or None)
    listed = interpreter.get_signature_list()
    if not listed:
        raise ValueError(f"{path}/{TFLITE_FILE} has no signatures (convert it from a SavedModel or concrete "
                         "functions, which keep them)")
    signatures = {}
    for name in listed:
        runner = interpreter.get_signature_runner(name)
        inputs = {n: _info(d) for n, d in sorted(runner.get_input_details().items())}
        outputs = {n: _info(d) for n, d in sorted(runner.get_output_details().items())}

        def run_fn(feeds: dict[str, np.ndarray], runner: Any = runner,
                   inputs: dict[str, TensorInfo] = inputs) -> dict[str, np.ndarray]:
            try:
                # The runner resizes each input to its batch; copies, as the interpreter reuses its buffers.
                result = runner(**{n: np.asarray(v, dtype=inputs[n].dtype) for n, v in feeds.items()})
            except (ValueError, RuntimeError) as exc:
                raise InvalidArgument(str(exc)) from exc
            return {n: np.array(v) for n, v in result.items()}

        signatures[name] = Signature(name, inputs, outputs, run_fn, interpreter)
    return LoadedModel(path, signatures, _signature_def_json(signatures), "tflite")


def _info(details: dict[str, Any]) -> TensorInfo:
    dtype = np.dtype(details["dtype"])
    name = "string" if dtype.kind in "OSU" else dtype.name
    return TensorInfo(name, tuple(int(d) for d in details["shape_signature"]))


def _signature_def_json(signatures: dict[str, Signature]) -> dict[str, Any]:
    """TF Serving's metadata JSON (a SignatureDefMap) for the interpreter's signatures."""
    def tensors(infos: dict[str, TensorInfo]) -> dict[str, Any]:
        return {n: {"dtype": "DT_" + TF_NAMES[i.dtype].upper(), "name": n,
                    "tensor_shape": {"dim": [{"size": str(d), "name": ""} for d in i.shape or ()],
                                     "unknown_rank": i.shape is None}}
                for n, i in infos.items()}
    return {"signature_def": {name: {"inputs": tensors(s.inputs), "outputs": tensors(s.outputs),
                                     "method_name": PREDICT_METHOD, "defaults": {}}
                              for name, s in signatures.items()}}
