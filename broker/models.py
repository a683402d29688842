"""The broker's view of its models: versions on disk, their state, and admission-time resolution."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

from broker.batching import BatchQueue
from broker.config import BatchingParameters, ModelConfig
from tfbroker.wire.errors import PLAIN_INSTANCES, Internal, InvalidArgument, NotFound, Unavailable
from broker.lifecycle import Lifecycle, Replica
from broker.links import WorkerLink
from broker.poison import PoisonRecord
from tfbroker.wire.figures import VersionStats
from tfbroker.wire.protocol import LookupSpec, SignatureSpec, TensorSpec
from tfbroker.wire.tensors import TF_NAMES, can_cast, nbytes
from broker.stats import VersionCounters
from broker.versions import VersionSnapshot, VersionState, aspired_versions

log = logging.getLogger("tfbroker.models")


def find_versions(base_path: str) -> dict[int, str]:
    """Numeric version directories under ``base_path`` (``00000123`` is version 123); none
    when it cannot be listed (``no_versions_reason`` says why)."""
    try:
        names = os.listdir(base_path)
    except OSError:
        return {}
    versions = {}
    for name in names:
        path = os.path.join(base_path, name)
        if name.isdigit() and os.path.isdir(path):
            versions[int(name)] = path
    return versions


def no_versions_reason(base_path: str) -> str:
    """Why ``base_path`` holds no version to serve, in words that say what to do."""
    path = os.path.normpath(base_path)
    layout = f"TF Serving's layout: {path}/1/saved_model.pb"
    if not os.path.exists(path):
        return f"base path {path} does not exist ({layout})"
    if not os.path.isdir(path):
        return f"base path {path} is not a directory ({layout})"
    if not os.access(path, os.R_OK | os.X_OK):
        return f"base path {path} cannot be read by this user"
    holds_model = any(os.path.isfile(os.path.join(path, name)) for name in ("saved_model.pb", "saved_model.pbtxt"))
    if holds_model and os.path.basename(path).isdigit():
        parent = os.path.dirname(path)
        return (f"no version directory under {path}: it looks like a version directory; "
                f"pass its parent {parent}")
    if holds_model:
        return (f"no version directory under {path}: it holds a SavedModel itself; move it into a "
                f"numbered folder ({path}/1) and pass {path}")
    return f"no numeric version directory under {path} ({layout})"


def fingerprint(path: str) -> tuple[tuple[str, int, int], ...]:
    """Names, sizes and modification times of every file under ``path``: a version directory
    is loaded once this stops changing (it may still be being copied), and retried after a
    failed load once it changes again."""
    entries = []
    for root, _dirs, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            try:
                stat = os.stat(full)
            except OSError:
                continue
            entries.append((os.path.relpath(full, path), stat.st_size, stat.st_mtime_ns))
    return tuple(sorted(entries))


@dataclass(slots=True)
class ServedVersion:
    model: str
    version: int
    path: str
    life: Lifecycle  # its state: broker/lifecycle.py alone changes it
    # What clients send and see (metadata): the model's own signatures (from READY), with a
    # lookup's raw input in place of the tensor it looks up (broker/lookups.py).
    signatures: dict[str, SignatureSpec] = field(default_factory=dict)
    signature_def: dict[str, Any] = field(default_factory=dict)
    model_signatures: dict[str, SignatureSpec] = field(default_factory=dict)
    model_signature_def: dict[str, Any] = field(default_factory=dict)
    queues: dict[str, BatchQueue] = field(default_factory=dict)
    workers: list[WorkerLink | None] = field(default_factory=list)  # by replica (device), once spawned
    files: tuple[Any, ...] = ()  # fingerprint() of the directory when it was loaded
    lookups: list[LookupSpec] = field(default_factory=list)  # from its tables' LOADED
    lookup_queue: BatchQueue | None = None  # requests waiting for an I/O batcher
    lookups_in_flight: int = 0  # requests at an I/O batcher
    load_started: float = 0.0  # monotonic s
    batching: BatchingParameters | None = None  # its own (batching_params.pbtxt), else the server's
    ended_at: float = 0.0
    counters: VersionCounters = field(default_factory=VersionCounters)  # for the metrics
    # Input checks that passed, by what they depend on (see check_inputs): most requests of
    # a version look alike, and admission then costs a dict lookup instead of the walk.
    checked: dict[tuple[Any, ...], tuple[Any, ...]] = field(default_factory=dict)
    poison: PoisonRecord = field(default_factory=PoisonRecord)  # requests that killed its worker

    @property
    def state(self) -> VersionState:
        return self.life.state

    @property
    def error(self) -> str:
        return self.life.error

    @property
    def failed(self) -> bool:
        return self.life.failed

    @property
    def draining(self) -> bool:
        """`broker.ctl drain`: loaded, but takes no new requests (a state of its lifecycle)."""
        return self.life.draining

    def replica_state(self, link: WorkerLink) -> Replica:
        """The replica's state in the lifecycle: the one record of whether it said READY."""
        states = self.life.workers
        return states[link.replica] if link.replica < len(states) else Replica.NONE

    def ready_links(self) -> list[WorkerLink]:
        """The replicas that take batches."""
        return [link for link in self.links() if self.replica_state(link) is Replica.READY]

    def snapshot(self) -> VersionSnapshot:
        return VersionSnapshot(self.version, self.state, self.failed)

    def has_work(self) -> bool:
        """Requests admitted to this version and not answered yet, in any stage."""
        return (any(len(q) for q in self.queues.values()) or any(link.in_flight for link in self.links())
                or bool(self.lookup_queue) or self.lookups_in_flight > 0)

    def link(self, replica: int) -> WorkerLink | None:
        return self.workers[replica] if replica < len(self.workers) else None

    def links(self) -> list[WorkerLink]:
        """Its worker processes, one per replica that has been spawned."""
        return [link for link in self.workers if link is not None]

    def status_json(self) -> dict[str, Any]:
        return {
            "version": str(self.version),
            "state": self.state.value,
            "status": {"error_code": "UNKNOWN" if self.error else "OK", "error_message": self.error},
        }


@dataclass(slots=True)
class ServedModel:
    """One model: its versions (live ones and a short history of ended ones) and its labels.

    What to serve is ``aspired()``: the version policy applied to the directories on disk,
    plus versions loaded by hand (``broker.ctl load``), minus those unloaded by hand.
    """

    config: ModelConfig
    versions: dict[int, ServedVersion] = field(default_factory=dict)
    on_disk: dict[int, str] = field(default_factory=dict)  # settled version directories
    labels: dict[str, int] = field(default_factory=dict)  # in force: each points at an AVAILABLE version
    wanted_labels: dict[str, int] = field(default_factory=dict)  # from config or ctl; applied when available
    loaded_by_hand: set[int] = field(default_factory=set)
    unloaded_by_hand: set[int] = field(default_factory=set)
    removed: bool = False  # gone from the config file: every version unloads
    unloaded: bool = False  # unloaded through the model repository extension: none serves until a load

    @property
    def name(self) -> str:
        return self.config.name

    def aspired(self) -> set[int]:
        if self.removed or self.unloaded:
            return set()
        wanted = aspired_versions(self.config.model_version_policy, self.on_disk)
        wanted |= self.loaded_by_hand & self.on_disk.keys()
        return wanted - self.unloaded_by_hand

    def snapshots(self) -> list[VersionSnapshot]:
        return [v.snapshot() for v in self.versions.values()]

    def update_labels(self) -> list[str]:
        """Point each wanted label at its version once that is AVAILABLE; drop labels whose
        version stopped serving. Returns what changed, for the log."""
        changes = []
        for label, number in self.wanted_labels.items():
            served = self.versions.get(number)
            if (served is not None and served.state is VersionState.AVAILABLE and not served.draining
                    and self.labels.get(label) != number):
                changes.append(f"label {label} -> version {number}")
                self.labels[label] = number
        for label, number in list(self.labels.items()):
            served = self.versions.get(number)
            if label not in self.wanted_labels:
                changes.append(f"label {label} removed")
                del self.labels[label]
            elif served is None or served.state is not VersionState.AVAILABLE or served.draining:
                changes.append(f"label {label} dropped: version {number} no longer takes requests")
                del self.labels[label]
        return changes

    def version_of_label(self, label: str) -> int:
        if label not in self.labels:
            raise InvalidArgument(f"Unrecognized servable version label: {label}")  # (TF Serving: 400)
        return self.labels[label]

    def resolve(self, version: int | None, label: str | None) -> ServedVersion:
        """The version a request is pinned to, chosen once at admission."""
        if self.unloaded:  # (the model repository's unload: new requests find no model from then on)
            raise NotFound(f"Servable not found for request: Latest({self.name}) (unloaded)")
        if label:
            version = self.version_of_label(label)
        if version is not None:
            served = self.versions.get(version)
            if served is None or served.state in (VersionState.END, VersionState.UNLOADING):
                state = f" (version {version} is {served.state.value}{_because(served)})" if served else ""
                raise NotFound(f"Servable not found for request: Specific({self.name}, {version}){state}")
            if served.state is not VersionState.AVAILABLE or served.draining:
                state = "draining" if served.draining else served.state.value
                raise Unavailable(f"Servable not available for request: Specific({self.name}, {version}): "
                                  f"version is {state}{_because(served)}")
            return served
        available = [v for v in self.versions.values() if v.state is VersionState.AVAILABLE and not v.draining]
        if available:
            return max(available, key=lambda v: v.version)
        live = [v for v in self.versions.values() if v.state is not VersionState.END]
        if self.removed or not self.versions:
            raise NotFound(f"Servable not found for request: Latest({self.name})")
        newest = max(live or self.versions.values(), key=lambda v: v.version)
        state = "draining" if newest.draining else newest.state.value
        raise Unavailable(f"Servable not available for request: Latest({self.name}): "
                          f"version {newest.version} is {state}{_because(newest)}")


def _because(served: ServedVersion) -> str:
    return f" ({served.error})" if served.error else ""


def check_inputs(served: ServedVersion, signature_name: str, specs: list[TensorSpec],
                 frames: list[Any], method: str = "predict", *, model_side: bool = False,
                 exact_dtypes: bool = False) -> tuple[int, Any]:
    """Validate a request's tensors against the signature; return its rows (batch dimension)
    and its join key: tasks of one batch with equal keys (same inputs, numeric dtypes and
    inner shapes) travel to the worker joined, one tensor per input (``None``: never joined).

    Cheap checks on the header and frame lengths only: the broker never decodes tensors.
    Every input's name, dtype, rank and fixed dimensions are checked, and the inputs the
    signature batches (-1 first) must agree on their rows. A request without one common
    batch dimension (a scalar, a fixed first dimension, zero rows) runs alone, as one row.
    ``model_side``: against the model's own signature (a request whose lookups are done),
    not the one clients see. ``exact_dtypes``: a tensor's dtype must be the signature's (gRPC,
    as TF Serving), not only one that JSON's rules let feed it.
    """
    signature = (served.model_signatures if model_side else served.signatures).get(signature_name)
    key = (signature_name, method, model_side, exact_dtypes, *specs)
    known = served.checked.get(key)
    if known is not None and known[0] is signature and len(frames) == len(known[3]):
        for size, frame in zip(known[3], frames):
            if size is not None and len(frame) != size:
                break
        else:
            return known[1], known[2]
    rows, join_key = _check_inputs(served, signature, signature_name, specs, frames, method, exact_dtypes)
    if len(served.checked) >= MAX_CHECKED:
        served.checked.clear()
    if len(frames) == len(specs):
        served.checked[key] = (signature, rows, join_key, [nbytes(spec) for spec in specs])
    return rows, join_key


MAX_CHECKED = 256  # kinds of request remembered per version


def _check_inputs(served: ServedVersion, signature: SignatureSpec | None, signature_name: str,
                  specs: list[TensorSpec], frames: list[Any], method: str, exact_dtypes: bool) -> tuple[int, Any]:
    if signature is None:
        raise InvalidArgument(f'Serving signature name: "{signature_name}" not found in signature def')
    if method != "predict":
        return _check_examples(served, signature_name, signature, method, specs)
    if len(frames) != len(specs):  # decode checks this on receipt; a lookup-rebuilt request too
        raise InvalidArgument(f"{len(specs)} input specs but {len(frames)} tensor frames")
    expected = signature.inputs
    _check_input_names(expected, [spec.name for spec in specs])
    given = set()
    rows: set[int] = set()
    batched: dict[str, int] = {}  # the rows of each input the signature gives a batch dimension (-1 first)
    alone = False
    join_key: list[tuple[str, str, tuple[int, ...]]] | None = []
    for spec, frame in zip(specs, frames):
        name = spec.name
        if name == "" and len(expected) == 1 and len(specs) == 1:
            name = next(iter(expected))  # an unnamed input is the signature's only input
        if name in given:
            raise InvalidArgument(f"input '{name}' is given twice")
        want, shape = expected[name]
        if not can_cast(spec.dtype, want) or (exact_dtypes and spec.dtype != want):
            raise InvalidArgument(f"input '{name}': values of type {TF_NAMES[spec.dtype]} are not of expected type: "
                                  f"{TF_NAMES[want]}")
        if shape is not None and not shape_fits(spec.shape, shape):
            raise InvalidArgument(f"input '{name}': expected shape {format_shape(shape)} ({want}), "
                                  f"got {format_shape(spec.shape)}")
        size = nbytes(spec)
        if size is not None and len(frame) != size:
            raise InvalidArgument(f"input '{name}': {len(frame)} bytes do not fill shape {list(spec.shape)} "
                                  f"of {spec.dtype}")
        given.add(name)
        if spec.shape:
            rows.add(spec.shape[0])
            if shape and shape[0] == -1:
                batched[name] = spec.shape[0]
            elif shape:
                alone = True  # a fixed first dimension: joined to another request's rows it would not fit
        else:
            alone = True
        if join_key is not None and size is not None and spec.shape:
            join_key.append((spec.name, spec.dtype, spec.shape[1:]))
        else:
            join_key = None
    if len(set(batched.values())) > 1:
        # TF Serving's words (batching_session.cc), then which input has how many.
        raise InvalidArgument("Batching session Run() input tensors must have equal 0th-dimension size: "
                              + ", ".join(f"input '{name}' has {count}" for name, count in sorted(batched.items())))
    if alone or len(rows) != 1 or 0 in rows:
        return 1, None  # runs alone: nothing to batch along
    return rows.pop(), tuple(join_key) if join_key else None


def shape_fits(given: tuple[int, ...] | list[int], declared: list[int]) -> bool:
    """Whether a request's shape fits a signature's: the same rank, and every fixed dimension
    (not -1) equal. A wrong rank or dimension can abort the process inside a TensorFlow
    kernel (oneDNN's Conv2D CHECKs the rank) instead of raising, so nothing that does not
    fit reaches the model. One exception, as TF Serving's own examples send it: a last
    dimension of 1 may be left out (``[3]`` for half_plus_two's ``[-1, 1]``); the model
    gets the request's shape, as TF Serving feeds it."""
    if len(given) == len(declared):
        return all(want < 0 or want == dim for dim, want in zip(given, declared))
    return len(given) == len(declared) - 1 and declared[-1] == 1 and shape_fits(given, declared[:-1])


def format_shape(shape: tuple[int, ...] | list[int]) -> str:
    return "[" + ",".join(str(dim) for dim in shape) + "]"


def _check_input_names(expected: dict[str, Any], names: list[str]) -> None:
    """TF Serving's words (predict_util.cc) for inputs that are not the signature's: a
    different count, or a name it does not know. An unnamed input is the only one's."""
    if names == [""] and len(expected) > 1:
        raise InvalidArgument(PLAIN_INSTANCES)
    given = [next(iter(expected)) if name == "" and len(expected) == 1 and len(names) == 1 else name
             for name in names]
    if len(set(given)) != len(expected):
        extra = sorted(set(given) - set(expected))
        missing = sorted(set(expected) - set(given))
        raise InvalidArgument(
            f"input size does not match signature: {len(set(given))}!={len(expected)} "
            f"len({{{','.join(sorted(set(given)))}}}) != len({{{','.join(sorted(expected))}}}). "
            f"Sent extra: {{{','.join(extra)}}}. Missing but required: {{{','.join(missing)}}}.")
    unknown = sorted(set(given) - set(expected))
    if unknown:
        raise InvalidArgument(f"input tensor alias not found in signature: {unknown[0]}. Inputs expected to be in "
                              f"the set {{{','.join(sorted(expected))}}}.")


PREDICT_METHOD = "tensorflow/serving/predict"
SIGNATURE_METHODS = (PREDICT_METHOD, "tensorflow/serving/classify", "tensorflow/serving/regress")


def check_method_name(served: ServedVersion, signature_name: str) -> None:
    """--enable_signature_method_name_check: predict only a signature of TF Serving's three
    methods (predict_util.cc's words and status)."""
    declared = served.signature_def.get("signature_def", {}).get(signature_name, {}).get("method_name", "")
    if declared not in SIGNATURE_METHODS:
        raise Internal(f"Expected prediction signature method_name to be one of {{{', '.join(SIGNATURE_METHODS)}}}. "
                       f"Was: {declared}")
# TF Serving's method names, and the outputs each needs (servables/tensorflow/classifier.cc,
# regressor.cc).
_METHODS = {"classify": ("classification", "tensorflow/serving/classify", ("classes", "scores")),
            "regress": ("regression", "tensorflow/serving/regress", ("outputs",))}


def _check_examples(served: ServedVersion, signature_name: str, signature: SignatureSpec, method: str,
                    specs: list[TensorSpec]) -> tuple[int, Any]:
    """A classify or regress request: one string tensor of serialized examples, for a
    signature of that method with one input and the outputs the method reads. A TF2 export
    marks every signature "predict": one whose single input is a string and whose outputs
    are the method's serves it too."""
    kind, method_name, outputs = _METHODS[method]
    declared = served.signature_def.get("signature_def", {}).get(signature_name, {}).get("method_name", "")
    takes_examples = len(signature.inputs) == 1 and next(iter(signature.inputs.values()))[0] == "string"
    if declared != method_name and not (declared == PREDICT_METHOD and takes_examples):
        raise InvalidArgument(f"Expected {kind} signature method_name to be {method_name}. Was: {declared}")
    if len(signature.inputs) != 1:
        raise InvalidArgument("Expected one input Tensor.")
    if not any(name in signature.outputs for name in outputs):
        raise InvalidArgument(f"Expected {kind} signature outputs to contain "
                              + " or ".join(f"'{name}'" for name in outputs))
    if len(specs) != 1 or specs[0].dtype != "string" or len(specs[0].shape) != 1:
        raise InvalidArgument(f"a {method} request carries one string tensor of serialized tf.Examples")
    return specs[0].shape[0], None  # runs alone: examples never join a numeric batch


def version_stats(served: ServedVersion, batching: BatchingParameters) -> VersionStats:
    """Its counters for the metrics and the status page; ``batching``: the broker's, unless the
    version has its own."""
    counters, links = served.counters, served.links()
    params = served.batching or batching
    return VersionStats(
        max_batch_size=params.max_batch_size, batch_timeout_micros=params.batch_timeout_micros,
        model=served.model, version=served.version, state=served.state.value,
        queued=sum(len(q) for q in served.queues.values()),
        in_flight=sum(1 for link in links for _ in link.tasks()),
        batches=counters.batches, rows=counters.rows, rejected=counters.rejected,
        batch_sizes=dict(counters.batch_sizes), input_sizes=dict(counters.input_sizes),
        padded_sizes={size: dict(padding) for size, padding in counters.padded_sizes.items()},
        exits=dict(counters.exits), queue_latency_buckets=list(counters.queue_latency_buckets),
        stage_buckets={stage: list(counts) for stage, counts in counters.stage_buckets.items()},
        stage_sums_us=dict(counters.stage_sums_us), request_stage_us=counters.request_stage_us,
        size_stats={rows: list(values) for rows, values in counters.size_stats.items()},
        last_batch_ms=counters.last_batch_ms, fill_buckets=list(counters.fill_buckets), fill_sum_us=counters.fill_sum_us,
        queue_latency_sum_us=counters.queue_latency_sum_us, load_attempts=dict(counters.load_attempts),
        load_latency_s=counters.load_latency_s, restarts=sum(link.child.restarts for link in links))
