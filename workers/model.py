"""Loading a SavedModel version and running its signatures on numpy arrays.

Every SavedModel loads first through TensorFlow's v1 loader into a Session, as TF Serving's
own C++ loader does (TF2 exports included): some TF1 exports load no other way, and a
Session callable costs a third of a concrete function's Python overhead per call (0.28 ms
against 0.70 ms for one row of bench's mlp). What the v1 loader refuses goes through
``tf.saved_model.load``.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import tensorflow as tf
from tensorflow.python.util import deprecation
from google.protobuf import json_format
from tensorflow.core.protobuf import config_pb2, meta_graph_pb2, saved_model_pb2

from tfbroker.runtime.devices import gpu_memory_mib
from tfbroker.wire.errors import InvalidArgument
from tfbroker.wire.protocol import STRING

log = logging.getLogger(__name__)

SERVE_TAG = "serve"
PREDICT_METHOD = "tensorflow/serving/predict"
TFLITE_FILE = "model.tflite"  # a version's TensorFlow Lite model (--prefer_tflite_model)


def has_tflite_model(path: str) -> bool:
    return os.path.isfile(os.path.join(path, TFLITE_FILE))


@dataclass(frozen=True, slots=True)
class TensorInfo:
    dtype: str  # numpy name or "string"
    shape: tuple[int, ...] | None  # -1 for an unknown dimension; None for unknown rank


@dataclass(slots=True)
class Signature:
    name: str
    inputs: dict[str, TensorInfo]
    outputs: dict[str, TensorInfo]
    run_fn: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
    owner: Any = None  # what must stay alive for run_fn to work (the session or trackable)
    # The model's own calls, timed for the worker's report of each batch (time.monotonic): their
    # seconds summed, when the first of a batch started (0 until one has) and the last ended.
    run_s: float = 0.0
    first_started: float = 0.0
    last_ended: float = 0.0

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        started = time.monotonic()
        if not self.first_started:
            self.first_started = started
        try:
            return self.run_fn(inputs)
        finally:
            self.last_ended = time.monotonic()
            self.run_s += self.last_ended - started

    def describe(self) -> dict[str, Any]:
        """The compact form sent in READY."""
        def specs(infos: dict[str, TensorInfo]) -> dict[str, Any]:
            return {n: [i.dtype, None if i.shape is None else list(i.shape)] for n, i in infos.items()}
        return {"inputs": specs(self.inputs), "outputs": specs(self.outputs)}


@dataclass(slots=True)
class LoadedModel:
    path: str
    signatures: dict[str, Signature]
    signature_def: dict[str, Any]  # TF Serving's JSON of the SignatureDefMap
    loader: str  # "v1" or "v2"


_session_config = tf.compat.v1.ConfigProto()


def intra_op_threads() -> int:
    """The CPU threads one op may use, as configure_devices set them (0: TensorFlow's choice)."""
    return int(_session_config.intra_op_parallelism_threads)


def configure_devices(intra_op_threads: int = 0, inter_op_threads: int = 0, *, gpu_memory_fraction: float = 0.0,
                      mixed_precision: str = "") -> None:
    """As TF Serving's flags of those names: GPU memory grown as needed (so a second version
    fits beside the first), or ``gpu_memory_fraction`` of the card taken at start; the CPU
    thread pools bounded (0: TensorFlow's choice); bfloat16 auto mixed precision."""
    for gpu in tf.config.list_physical_devices("GPU"):
        total_mib = gpu_memory_mib(os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0])
        if gpu_memory_fraction and total_mib:
            limit = tf.config.LogicalDeviceConfiguration(memory_limit=int(total_mib * gpu_memory_fraction))
            tf.config.set_logical_device_configuration(gpu, [limit])
        else:
            if gpu_memory_fraction:
                log.warning("per_process_gpu_memory_fraction: the card's memory is unknown (nvidia-smi does not "
                            "answer): growing as needed instead")
            tf.config.experimental.set_memory_growth(gpu, True)
    tf.config.threading.set_intra_op_parallelism_threads(intra_op_threads)
    tf.config.threading.set_inter_op_parallelism_threads(inter_op_threads)
    _session_config.gpu_options.allow_growth = not gpu_memory_fraction
    _session_config.gpu_options.per_process_gpu_memory_fraction = gpu_memory_fraction
    _session_config.intra_op_parallelism_threads = intra_op_threads
    _session_config.inter_op_parallelism_threads = inter_op_threads
    if mixed_precision == "bfloat16":
        tf.config.optimizer.set_experimental_options({"auto_mixed_precision_onednn_bfloat16": True})
        _session_config.graph_options.rewrite_options.auto_mixed_precision_onednn_bfloat16 = 1  # ON


def load(path: str, tags: tuple[str, ...] = (SERVE_TAG,)) -> LoadedModel:
    """Load the SavedModel in ``path`` (a version directory): the MetaGraph with ``tags``
    (TF Serving's --saved_model_tags). (A model.tflite: workers/tflite_model.py.)"""
    if not os.path.exists(os.path.join(path, "saved_model.pb")) and has_tflite_model(path):
        raise ValueError(f"{path} holds a TensorFlow Lite model ({TFLITE_FILE}) and no SavedModel: "
                         "serve it with --prefer_tflite_model")
    meta_graph = _serving_meta_graph(path, tags)
    signature_def = _signature_def_json(meta_graph)
    errors = []
    for loader in (_load_v1, _load_v2):
        try:
            signatures = loader(path, meta_graph, tags)
        except Exception as exc:  # noqa: BLE001 - TensorFlow raises many types here
            errors.append(f"{loader.__name__[6:]} loader: {type(exc).__name__}: {exc}")
            log.info("loading %s with the %s loader failed: %s", path, loader.__name__[6:], exc)
            continue
        if not signatures:
            raise ValueError(f"SavedModel {path} has no servable signatures")
        return LoadedModel(path, signatures, signature_def, loader.__name__[6:])
    raise ValueError(f"cannot load SavedModel {path}: " + "; ".join(errors))


# --- implementation ---

def _serving_meta_graph(path: str, tags: tuple[str, ...]) -> meta_graph_pb2.MetaGraphDef:
    pb_path = os.path.join(path, "saved_model.pb")
    try:
        with open(pb_path, "rb") as fh:
            saved_model = saved_model_pb2.SavedModel.FromString(fh.read())
    except OSError as exc:
        raise ValueError(f"no SavedModel in {path}: {exc.strerror}") from exc
    for meta_graph in saved_model.meta_graphs:
        if set(tags) == set(meta_graph.meta_info_def.tags):
            return meta_graph
    raise ValueError(f"SavedModel {path} has no MetaGraph tagged {','.join(tags)!r}")


def _signature_def_json(meta_graph: meta_graph_pb2.MetaGraphDef) -> dict[str, Any]:
    from tensorflow_serving.apis import get_model_metadata_pb2

    sig_map = get_model_metadata_pb2.SignatureDefMap()
    for name, sig in meta_graph.signature_def.items():
        sig_map.signature_def[name].CopyFrom(sig)
    return json_format.MessageToDict(
        sig_map, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def _servable(name: str, sig: meta_graph_pb2.SignatureDef) -> bool:
    return not name.startswith("__") and bool(sig.inputs) and bool(sig.outputs)


def _dtype_name(dtype: tf.dtypes.DType) -> str:
    return STRING if dtype == tf.string else np.dtype(dtype.as_numpy_dtype).name


def _load_v1(path: str, meta_graph: meta_graph_pb2.MetaGraphDef, tags: tuple[str, ...]) -> dict[str, Signature]:
    graph = tf.Graph()
    session = tf.compat.v1.Session(graph=graph, config=_session_config)
    # The v1 loader is deprecated in TensorFlow 2, and says so in every worker: not the operator's concern.
    with graph.as_default(), deprecation.silence():
        loaded = tf.compat.v1.saved_model.loader.load(session, list(tags), path)
    signatures = {}
    for name, sig in loaded.signature_def.items():
        if not _servable(name, sig):
            continue
        in_names = sorted(sig.inputs)
        out_names = sorted(sig.outputs)
        # A callable made from CallableOptions runs in C++ without Session.run's Python-side
        # check of feed shapes against static shapes: TF Serving feeds [3] to an input the
        # signature declares [-1, 1] (half_plus_two's own example), and so must we.
        options = config_pb2.CallableOptions(
            feed=[sig.inputs[n].name for n in in_names],
            fetch=[sig.outputs[n].name for n in out_names])
        run = session._make_callable_from_options(options)  # noqa: SLF001

        def run_fn(inputs: dict[str, np.ndarray], run: Any = run, in_names: list[str] = in_names,
                   out_names: list[str] = out_names) -> dict[str, np.ndarray]:
            try:
                values = run(*[inputs[n] for n in in_names])
            except tf.errors.InvalidArgumentError as exc:
                raise InvalidArgument(model_error(exc.message)) from exc
            return dict(zip(out_names, values))

        signatures[name] = Signature(
            name,
            {n: _info(sig.inputs[n]) for n in in_names},
            {n: _info(sig.outputs[n]) for n in out_names},
            run_fn, session)
    return signatures


def _load_v2(path: str, meta_graph: meta_graph_pb2.MetaGraphDef, tags: tuple[str, ...]) -> dict[str, Signature]:
    loaded = tf.saved_model.load(path, tags=list(tags))
    signatures = {}
    for name, fn in loaded.signatures.items():
        sig = meta_graph.signature_def.get(name)
        if sig is None or not _servable(name, sig):
            continue
        input_specs = fn.structured_input_signature[1]
        outputs = fn.structured_outputs

        def run_fn(inputs: dict[str, np.ndarray], fn: Any = fn) -> dict[str, np.ndarray]:
            try:
                result = fn(**{n: tf.constant(v) for n, v in inputs.items()})
            except (tf.errors.InvalidArgumentError, TypeError, ValueError) as exc:
                raise InvalidArgument(model_error(getattr(exc, "message", None) or str(exc))) from exc
            return {n: t.numpy() for n, t in result.items()}

        signatures[name] = Signature(
            name,
            {n: TensorInfo(_dtype_name(s.dtype), _dims(s.shape)) for n, s in sorted(input_specs.items())},
            {n: TensorInfo(_dtype_name(s.dtype), _dims(s.shape)) for n, s in sorted(outputs.items())},
            run_fn, loaded)  # concrete functions hold only weak references to ``loaded``
    return signatures


# What TensorFlow appends to an error about where in the graph it arose: its function and node
# names say nothing to a client ("[[{{function_node __inference_serve_26}}{{node mul}}]]").
_GRAPH_WHERE = re.compile(r"\s*\[\[\{\{.*?\}\}\]\]", re.S)


def model_error(message: str) -> str:
    """TensorFlow's error message without the graph's internals, for the client."""
    return _GRAPH_WHERE.sub("", message).strip()


def _info(tensor_info: Any) -> TensorInfo:
    dtype = _dtype_name(tf.dtypes.as_dtype(tensor_info.dtype))
    shape = tensor_info.tensor_shape
    dims = None if shape.unknown_rank else tuple(int(d.size) for d in shape.dim)
    return TensorInfo(dtype, dims)


def _dims(shape: tf.TensorShape) -> tuple[int, ...] | None:
    if shape.rank is None:
        return None
    return tuple(-1 if d is None else int(d) for d in shape.as_list())
