"""The tfbroker wire protocol (TFB/5): frontends, broker, workers, I/O batchers and ctl over ZeroMQ.

Depends only on the standard library and msgspec. Every message, in both directions, is a
multipart ZeroMQ message:

    Frame 0   b"TFB05"                 protocol tag and version; a peer with another tag
                                       is rejected on its first message
    Frame 1   one byte                 command (below)
    Frame 2   msgpack map              the header: one typed struct per message kind
    Frame 3…  raw bytes                payload: one frame per tensor, never pickled

A ROUTER sees the sender's identity frame before Frame 0; no empty delimiter (all DEALERs).

The header of each message kind is a ``msgspec.Struct`` below (its fields' bounds and types in
tfbroker/wire/fields.py; what a StatsReply carries in tfbroker/wire/figures.py); ``encode`` and ``decode`` are
the only way in and out. ``decode`` checks the tag, that the command is one the receiving
socket takes, every header field (types, ranges, lengths, the consistency of its lists)
and the number of payload frames, and raises ProtocolError otherwise, so no other module
picks a header apart by hand and a malformed message is an error answer, never an
exception in a poll loop. Headers that share a command (the answers of REPLY, the forms of
BATCH and RESULT) carry a ``kind`` tag.

Tensors travel as a spec ``[name, dtype, shape]`` in the header plus one frame each, never
pickled (tfbroker/wire/tensors.py: numeric frames are the array's buffer, strings a msgpack array of
byte strings). An input named "" is the signature's only input (``"instances": [1.0, 2.0]``).

Commands and their headers
--------------------------
Client (frontend or ``tfbroker.client``) to broker, on the broker's frontend ROUTER:

    REQUEST   Request {id, model, method?, version?, label?, signature, timeout_ms, inputs:
              [spec…], exact_dtypes?, trace?} + one frame per input. ``exact_dtypes`` (gRPC): each
              dtype must be its input's. ``version`` and ``label`` are optional: the
              latest available version serves when both are absent. ``timeout_ms`` is the
              request's deadline, counted from when the broker receives it. ``method``
              "classify" or "regress" (default "predict") sends one string input of
              serialized tf.Examples to a signature of that method (TF Serving's APIs).
              ``trace``: the W3C traceparent of the caller's span, only when its trace
              is sampled (tfbroker/runtime/tracing.py).
    METADATA  Query {id, model, version?, label?}
    STATUS    Query {id, model, version?, label?}
    STATS     Query {id}                 the broker's counters, each version's, and the CPU and
                                         memory of its processes by role (metrics, bench/)
    HEALTH    Query {id, model?, version?, label?}   whether the broker serves: without a model,
                                         it is not stopping and every model has a version
                                         AVAILABLE; with one, that model (at that version)
    REPOSITORY Repository {id, op, model?, ready_only?}   the model repository extension
                                         (index, load, unload); answered by ControlReply
                                         {body: {models: [...]}} or {body: {changes}};
                                         load and unload only with --enable_model_control
    LOGGING   Query {id}                 the request logs the frontends write: ControlReply
                                         {body: {models: {name: {sampling_rate,
                                         filename_prefix, only_inputs: {version: {signature:
                                         input}}}}, saved_model_tags}} for each model with a
                                         logging_config (frontend/request_log.py)
    CANCEL    Cancel {id}                the client gave up: drop the request if it has not
                                         been dispatched (it is answered with ERROR 499)
    RELOAD    Reload {id, config}        TF Serving's ModelService.HandleReloadConfigRequest:
                                         ``config``, a ModelServerConfig in text format,
                                         replaces the served models (as ``broker.ctl
                                         reload-config`` with the config file)
    HEARTBEAT Heartbeat {}
    BUNDLE    Bundle {commands, headers: [header…], counts: [n…]} + the members'
              payload frames end to end: several of the messages above (not BUNDLE) sent
              as one. Member i is the message with command ``commands[i]`` (one byte
              each), header ``headers[i]`` (a msgpack bin: the bytes of the header it
              would carry alone) and the next ``counts[i]`` payload frames. What a client
              has ready at the same moment goes as one BUNDLE; a lone message goes as
              itself. Each member is decoded and answered on its own: a malformed one
              fails alone. (The headers travel in the BUNDLE's own header, not as frames:
              every frame costs its receiver a receive and a more-frames check, 2 µs a
              request in the broker.)

Broker to client:

    REPLY     PredictReply {kind: "p", id, model, version, outputs: [spec…]} + one frame
              per output (REQUEST); MetadataReply {kind: "m", id, model, version,
              signature_def} (METADATA); StatusReply {kind: "s", id, model,
              model_version_status: [{version, state, status}…]} (STATUS); StatsReply
              {kind: "c", id, counters: {name: n}, versions: [VersionStats…], processes:
              [[role, processes, cpu_seconds, rss_bytes]…], status: {models, broker, history,
              iobatchers}} (STATS); HealthReply {kind: "h", id, ready, reason} (HEALTH;
              ``reason``: why not ready); ControlReply {kind:
              "ctl", id, body: {changes: [text…]}} (RELOAD); RowsReply {kind: "r", ids: [id…],
              rows: [n…], model, version, outputs: [spec…]} + one frame per output: the
              answers to several REQUESTs of one batch at once, each output the requests'
              rows end to end in ``ids`` order (a request's own outputs are its rows)
    ERROR     Error {id, code, message}  ``code`` is the HTTP status (tfbroker/wire/errors.py);
                                         ``id`` is nil when the message had none readable
    HEARTBEAT Heartbeat {}               the answer to a client's HEARTBEAT
    BUNDLE    Bundle {commands, headers, counts} as above, of REPLY and ERROR members: what
                                         the broker has for a client at the end of one turn
                                         of its loop

Worker to broker, on the broker's backend ROUTER (the worker's identity is its own):

    READY      Ready {kind: "w", model, version, pid, signatures: {name: {inputs: {n: [dtype,
               shape]}, outputs: {…}}}, signature_def: {…}}   loaded and warmed up
    RESULT     TaskResult {kind: "t", batch, counts: [n…]} then, per task in batch order,
               ``n`` frames that form a complete client message without the tag:
               ``[REPLY|ERROR, header, frames…]``; or, for a joined BATCH whose outputs are
               all numeric and cut by rows, JoinedResult {kind: "j", batch, model, version,
               outputs: [spec…]} + one frame per output, the tasks' rows in batch order
               (the broker cuts them into one REPLY per task). Both carry the batch's time
               in the worker, {input_us, model_us, output_us}: inputs assembled, the
               model's own calls, outputs cut and encoded (the broker's stage latencies)
    HEARTBEAT  Heartbeat {}
    DISCONNECT Disconnect {error}         a worker going away (``error``: why it failed to load)

Broker to worker:

    BATCH      TaskBatch {kind: "t", batch, signature, padded_rows, counts: [n…],
               timeouts_ms: [ms…]} then, per task, ``n`` frames: the task's REQUEST header
               exactly as the client sent it, then its tensors; or, joined, when every task
               has the same numeric inputs (names, order, dtypes, inner shapes): JoinedBatch
               {kind: "j", batch, signature, padded_rows, ids: [id…], rows: [n…],
               timeouts_ms: [ms…], inputs: [spec…]} + one frame per input, the tasks' rows
               end to end. ``timeouts_ms`` is each task's time left when the broker sent the
               batch: the worker answers a task whose time ran out with 504, unrun.
               Both may carry ``traces``: the traceparents of the broker's batch spans for
               the traced tasks among them; the worker adds its model span to each.
    HEARTBEAT  Heartbeat {}
    DISCONNECT Disconnect {}              stop after the batches in hand

I/O batcher to broker, on the same backend ROUTER:

    READY      IoReady {kind: "io", pid}          up; send LOAD for the tables it should hold
    LOADED     TablesLoaded {model, version, lookups: [[input, input_dtype, output,
               output_dtype, dim]…], error}        a version's tables are loaded, or ``error``
    RESULT     LookupResult {kind: "l", batch, counts: [n…], outputs: [spec…], failures:
               [[task, code, message]…], keys, unique_keys} + one frame per output: each
               task's looked-up tensors in order (``n`` = 0 for a failed task)
    HEARTBEAT, DISCONNECT as a worker's

Broker to I/O batcher:

    LOAD       Tables {model, version, path}     load ``path/assets.extra/lookups.json``
    UNLOAD     Tables {model, version}           drop that version's tables
    BATCH      LookupBatch {kind: "l", batch, model, version, counts: [n…], timeouts_ms,
               inputs: [spec…], traces?} + one frame per input: each task's lookup inputs in
               order (``traces``: as a model BATCH's)
    HEARTBEAT, DISCONNECT as to a worker

Control client (``python -m broker.ctl``) to broker, on the broker's control ROUTER:

    CONTROL    Control {id, op, args: {model?, version?, label?}}
               op: status | reload-config | load | unload | label | drain
    answered by REPLY ControlReply {kind: "ctl", id, body: {…}} or ERROR {id, code, message}

Dialogs
-------
    C: REQUEST          B: REPLY | ERROR            exactly one answer per id, unless the
                                                    client's own deadline passes first
    C: BUNDLE           B: the answer to each member, as if each had come alone (in
                                                    BUNDLEs of their own making)
    C: CANCEL           B: ERROR 499 for that id, if it was still queued; else nothing more
    C: anything else    B: the matching REPLY, or ERROR 400 (also for commands a client
                                                    may not send)
    W: READY            then repeat  B: BATCH  W: RESULT   (at most batches_in_flight
                                                    BATCHes unanswered per worker)
    I: READY            B: LOAD… I: LOADED…, then BATCH / RESULT as a worker's, and LOAD,
                                                    UNLOAD as versions come and go
    any peer: HEARTBEAT whenever it has sent nothing for heartbeat_interval_s

Any message counts as a sign of life. A peer silent for interval × liveness is dead: the
broker fails a dead worker's batches with 503 at once and restarts it; a client fails its
pending requests with 503 and opens a fresh socket. A worker that hears nothing from the
broker reconnects and sends READY again.

Known weaknesses
----------------
- Without CURVE (``--curve_secret_key_file``), sockets have no authentication: the broker
  refuses to bind a TCP address other than loopback unless CURVE is configured.
- A worker that runs one batch longer than interval × liveness is taken for dead: size
  the heartbeat settings above the slowest legitimate batch.
- ``id`` is unique per client socket only; the broker keys requests by (identity, id).
- Deadlines travel as time left, not as clock readings: time spent in ZeroMQ's queues
  between two peers is not counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Iterable, Literal, Sequence, Union

import msgspec

from tfbroker.wire.errors import ProtocolError
from tfbroker.wire.fields import (MAX_CONFIG_CHARS, MAX_MESSAGE_CHARS, MAX_TASKS, MAX_TENSORS, MAX_TIMEOUT_MS, Count,
                                  DType, Id, Json, Micros, Name, Shape, Tasks, TensorName, Timeouts, Traceparent,
                                  Traceparents, Version)
from tfbroker.wire.figures import ProcessStats, VersionStats

TAG = b"TFB05"

REQUEST = b"\x01"
REPLY = b"\x02"
ERROR = b"\x03"
METADATA = b"\x04"
STATUS = b"\x05"
HEARTBEAT = b"\x06"
READY = b"\x07"
BATCH = b"\x08"
RESULT = b"\x09"
DISCONNECT = b"\x0a"
STATS = b"\x0b"
CONTROL = b"\x0c"
CANCEL = b"\x0d"
LOAD = b"\x0e"
UNLOAD = b"\x0f"
LOADED = b"\x10"
RELOAD = b"\x11"
BUNDLE = b"\x12"
HEALTH = b"\x13"
REPOSITORY = b"\x14"
LOGGING = b"\x15"

STRING = "string"

Specs = Annotated[list["TensorSpec"], msgspec.Meta(max_length=MAX_TENSORS)]


class TensorSpec(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """``[name, dtype, shape]`` of one tensor frame."""

    name: TensorName
    dtype: DType
    shape: Shape


class Header(msgspec.Struct, kw_only=True, omit_defaults=True, gc=False):
    """Base of every header: how many payload frames follow it. Untracked by the garbage
    collector (gc=False): a header refers to no header, so it is in no cycle, and a busy
    broker or frontend makes one or two a request that would otherwise fill its collections."""

    def frame_count(self) -> int:
        return 0


# --- client <-> broker ---

class Request(Header, kw_only=True):
    id: Id
    model: Name
    method: Literal["predict", "classify", "regress"] = "predict"
    signature: Name = "serving_default"
    version: Version | None = None
    label: Name | None = None
    timeout_ms: Annotated[int, msgspec.Meta(ge=1, le=MAX_TIMEOUT_MS)]
    inputs: Specs
    # Each tensor's dtype must be its input's (gRPC, as TF Serving); else JSON's rules apply
    # (an int feeds a float input).
    exact_dtypes: bool = False
    trace: Traceparent | None = None  # the caller's span, when its trace is sampled

    def frame_count(self) -> int:
        return len(self.inputs)


class Query(Header):
    """METADATA, STATUS, STATS, HEALTH and LOGGING."""

    id: Id
    model: Name | None = None
    version: Version | None = None
    label: Name | None = None


class Cancel(Header):
    id: Id


class Heartbeat(Header):
    pass


class Outputs(Header, kw_only=True):
    """A model's outputs: one frame per spec (PredictReply to a client, JoinedResult from a worker)."""

    model: Name
    version: Version
    outputs: Specs

    def frame_count(self) -> int:
        return len(self.outputs)


class PredictReply(Outputs, kw_only=True, tag_field="kind", tag="p"):
    id: Id


class MetadataReply(Header, tag_field="kind", tag="m"):
    id: Id
    model: Name
    version: Version
    signature_def: Json


class RowsReply(Outputs, kw_only=True, tag_field="kind", tag="r"):
    """Several requests' answers from one batch: ``rows[i]`` rows of every output are ``ids[i]``'s."""

    ids: Annotated[list[Id], msgspec.Meta(max_length=MAX_TASKS)]
    rows: Tasks

    def __post_init__(self) -> None:
        total = sum(self.rows)
        if len(self.ids) != len(self.rows) or any(
                not spec.shape or spec.shape[0] != total or spec.dtype == STRING for spec in self.outputs):
            raise ValueError(f"one row count per id, and every output numeric with {total} rows")


class StatusReply(Header, tag_field="kind", tag="s"):
    id: Id
    model: Name
    model_version_status: list[Json]


class HealthReply(Header, tag_field="kind", tag="h"):
    id: Id
    ready: bool
    reason: Annotated[str, msgspec.Meta(max_length=MAX_CONFIG_CHARS)] = ""


class StatsReply(Header, tag_field="kind", tag="c"):
    id: Id
    counters: dict[str, int]
    versions: list[VersionStats] = msgspec.field(default_factory=list)
    processes: list[ProcessStats] = msgspec.field(default_factory=list)
    status: Json = msgspec.field(default_factory=dict)  # broker.ctl status's answer, the last version changes, I/O batchers


class ControlReply(Header, tag_field="kind", tag="ctl"):
    id: Id
    body: Json


class Bundle(Header):
    """Several messages as one: member i is ``commands[i]``, ``headers[i]`` (its header's
    msgpack bytes, decoded on its own, so a bad one fails alone) and ``counts[i]`` payload frames."""

    commands: Annotated[bytes, msgspec.Meta(max_length=MAX_TASKS)]
    headers: Annotated[list[bytes], msgspec.Meta(max_length=MAX_TASKS)]
    counts: Annotated[list[Annotated[int, msgspec.Meta(ge=0, le=MAX_TENSORS)]], msgspec.Meta(max_length=MAX_TASKS)]

    def __post_init__(self) -> None:
        if not len(self.commands) == len(self.headers) == len(self.counts):
            raise ValueError(f"{len(self.commands)} commands, {len(self.headers)} headers and "
                             f"{len(self.counts)} counts: one each per member")

    def frame_count(self) -> int:
        return sum(self.counts)


class Error(Header):
    id: Id | None
    code: Annotated[int, msgspec.Meta(ge=400, le=599)]
    message: Annotated[str, msgspec.Meta(max_length=MAX_MESSAGE_CHARS)]


# --- worker <-> broker ---

class SignatureSpec(msgspec.Struct, kw_only=True):
    """A signature as READY describes it: ``{name: [dtype, shape or nil]}`` each way;
    -1 is an unknown dimension."""

    inputs: dict[Name, tuple[DType, list[Annotated[int, msgspec.Meta(ge=-1)]] | None]]
    outputs: dict[Name, tuple[DType, list[Annotated[int, msgspec.Meta(ge=-1)]] | None]]


class Ready(Header, tag_field="kind", tag="w"):
    model: Name
    version: Version
    pid: int
    signatures: dict[Name, SignatureSpec]
    signature_def: Json


class TaskBatch(Header, kw_only=True, tag_field="kind", tag="t"):
    batch: Id
    signature: Name
    padded_rows: Count = 0
    counts: Tasks
    timeouts_ms: Timeouts
    traces: Traceparents = msgspec.field(default_factory=list)  # the traced tasks' batch spans

    def __post_init__(self) -> None:
        if len(self.counts) != len(self.timeouts_ms) or 0 in self.counts:
            raise ValueError("counts and timeouts_ms must be equally long, and every count at least 1")

    def frame_count(self) -> int:
        return sum(self.counts)


class JoinedBatch(Header, kw_only=True, tag_field="kind", tag="j"):
    batch: Id
    signature: Name
    padded_rows: Count = 0
    ids: Annotated[list[Id], msgspec.Meta(max_length=MAX_TASKS)]
    rows: Tasks
    timeouts_ms: Timeouts
    inputs: Specs
    traces: Traceparents = msgspec.field(default_factory=list)

    def __post_init__(self) -> None:
        if not len(self.ids) == len(self.rows) == len(self.timeouts_ms):
            raise ValueError("ids, rows and timeouts_ms must be equally long")
        total = sum(self.rows)
        if any(not spec.shape or spec.shape[0] != total for spec in self.inputs):
            raise ValueError(f"every joined input needs a batch dimension of {total} rows")

    def frame_count(self) -> int:
        return len(self.inputs)


class TaskResult(Header, tag_field="kind", tag="t"):
    batch: Id
    counts: Tasks
    # Where the batch's time went in the worker: its inputs assembled (decoded, joined, padded:
    # receipt to the model's first call), the model's own calls, its outputs cut and encoded
    # (the last call's end to this reply).
    input_us: Micros = 0
    model_us: Micros = 0
    output_us: Micros = 0

    def frame_count(self) -> int:
        return sum(self.counts)


class JoinedResult(Outputs, kw_only=True, tag_field="kind", tag="j"):
    batch: Id
    input_us: Micros = 0  # as TaskResult's
    model_us: Micros = 0
    output_us: Micros = 0


class Disconnect(Header):
    error: Annotated[str, msgspec.Meta(max_length=MAX_MESSAGE_CHARS)] = ""


# --- I/O batcher <-> broker ---

class IoReady(Header, tag_field="kind", tag="io"):
    pid: int


class LookupSpec(msgspec.Struct, array_like=True, frozen=True):
    """One declared lookup: the raw input clients send, the tensor the model gets in its place."""

    input: Name
    input_dtype: Literal["string", "int64"]
    output: Name
    output_dtype: Literal["int64", "float32"]
    dim: Count  # the embedding's width; 0 for a vocabulary (the output has the input's shape)


class Tables(Header):
    model: Name
    version: Version
    path: Annotated[str, msgspec.Meta(max_length=4096)] = ""


class TablesLoaded(Header):
    model: Name
    version: Version
    lookups: Annotated[list[LookupSpec], msgspec.Meta(max_length=MAX_TENSORS)]
    error: Annotated[str, msgspec.Meta(max_length=MAX_MESSAGE_CHARS)] = ""


class LookupBatch(Header, kw_only=True, tag_field="kind", tag="l"):
    batch: Id
    model: Name
    version: Version
    counts: Tasks
    timeouts_ms: Timeouts
    inputs: Specs
    traces: Traceparents = msgspec.field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.counts) != len(self.timeouts_ms) or sum(self.counts) != len(self.inputs):
            raise ValueError("one count and timeout per task, and the counts must add up to the inputs")

    def frame_count(self) -> int:
        return len(self.inputs)


class LookupFailure(msgspec.Struct, array_like=True):
    task: Count
    code: Annotated[int, msgspec.Meta(ge=400, le=599)]
    message: Annotated[str, msgspec.Meta(max_length=MAX_MESSAGE_CHARS)]


class LookupResult(Header, kw_only=True, tag_field="kind", tag="l"):
    batch: Id
    counts: Tasks
    outputs: Specs
    failures: Annotated[list[LookupFailure], msgspec.Meta(max_length=MAX_TASKS)] = msgspec.field(default_factory=list)
    keys: Count = 0  # keys looked up, and how many of them were distinct (the batching's gain)
    unique_keys: Count = 0

    def __post_init__(self) -> None:
        if sum(self.counts) != len(self.outputs) or any(f.task >= len(self.counts) for f in self.failures):
            raise ValueError("the counts must add up to the outputs, and failures name tasks of the batch")

    def frame_count(self) -> int:
        return len(self.outputs)


# --- control ---

class ControlArgs(msgspec.Struct, kw_only=True, omit_defaults=True):
    model: Name | None = None
    version: Version | None = None
    label: Name | None = None


class Reload(Header):
    id: Id
    config: Annotated[str, msgspec.Meta(max_length=MAX_CONFIG_CHARS)]


class Repository(Header):
    """The Open Inference Protocol's model repository extension: ``index`` (every model's
    versions and states; ``ready_only``: the AVAILABLE ones), ``load`` or ``unload`` ``model``."""

    id: Id
    op: Literal["index", "load", "unload"]
    model: Name | None = None
    ready_only: bool = False


class Control(Header):
    id: Id
    op: Literal["status", "reload-config", "load", "unload", "label", "drain"]
    args: ControlArgs = msgspec.field(default_factory=ControlArgs)


Reply = Union[PredictReply, RowsReply, MetadataReply, StatusReply, StatsReply, ControlReply, HealthReply]

HEADER_TYPES: dict[bytes, Any] = {
    REQUEST: Request, REPLY: Reply, ERROR: Error, METADATA: Query, STATUS: Query, HEARTBEAT: Heartbeat,
    READY: Union[Ready, IoReady], BATCH: Union[TaskBatch, JoinedBatch, LookupBatch],
    RESULT: Union[TaskResult, JoinedResult, LookupResult], DISCONNECT: Disconnect, STATS: Query, CONTROL: Control,
    CANCEL: Cancel, LOAD: Tables, UNLOAD: Tables, LOADED: TablesLoaded, RELOAD: Reload, BUNDLE: Bundle, HEALTH: Query,
    LOGGING: Query,
    REPOSITORY: Repository,
}

# What each socket takes: anything else is answered (clients) or dropped and counted (workers).
CLIENT_TO_BROKER = frozenset({REQUEST, METADATA, STATUS, STATS, CANCEL, HEARTBEAT, RELOAD, BUNDLE, HEALTH,
                              REPOSITORY, LOGGING})
BROKER_TO_CLIENT = frozenset({REPLY, ERROR, HEARTBEAT, BUNDLE})
WORKER_TO_BROKER = frozenset({READY, RESULT, HEARTBEAT, DISCONNECT, LOADED})  # workers and I/O batchers
BROKER_TO_WORKER = frozenset({BATCH, HEARTBEAT, DISCONNECT})
BROKER_TO_IOBATCHER = frozenset({BATCH, HEARTBEAT, DISCONNECT, LOAD, UNLOAD})
CTL_TO_BROKER = frozenset({CONTROL})

_DECODERS = {command: msgspec.msgpack.Decoder(kind) for command, kind in HEADER_TYPES.items()}
_encoder = msgspec.msgpack.Encoder()


class _IdOnly(msgspec.Struct):
    id: Id | None = None


_id_only = msgspec.msgpack.Decoder(_IdOnly)
_COMMANDS = [bytes((value,)) for value in range(256)]  # a BUNDLE's command bytes as commands


@dataclass(frozen=True, slots=True)
class Message:
    """A decoded message: its command, its typed header, its raw payload frames and the
    header frame as it came (the broker forwards a request's to the worker unchanged)."""

    command: bytes
    header: Any
    frames: list[Any]
    header_frame: Any = None


def encode(command: bytes, header: Header, frames: Iterable[Any] = ()) -> list[Any]:
    """Frames for one message (without a ROUTER identity)."""
    return [TAG, command, _encoder.encode(header), *frames]


def encode_header(header: Header) -> bytes:
    """The header frame alone (for the per-task messages inside RESULT)."""
    return _encoder.encode(header)


def decode(frames: Sequence[Any], accept: frozenset[bytes]) -> Message:
    """Check the tag, that ``accept`` holds the command, the header and the frame count;
    raises ProtocolError."""
    if len(frames) < 3:
        raise ProtocolError(f"a message needs at least 3 frames, got {len(frames)}")
    tag = bytes(frames[0])
    if tag != TAG:
        raise ProtocolError(f"protocol tag {tag[:16]!r} is not {TAG!r}")
    return _decode_body(frames, 1, len(frames), accept)


@dataclass(frozen=True, slots=True)
class Malformed:
    """A member of a BUNDLE that failed to decode, with its ``id`` when one is readable (to answer it)."""

    id: int | None
    error: ProtocolError


def bundle(members: Sequence[Sequence[Any]]) -> list[Any]:
    """One message for several, each ``[command, header, frames…]`` without the tag: a lone
    one as itself, more as a BUNDLE."""
    if len(members) == 1:
        return [TAG, *members[0]]
    payload: list[Any] = []
    for member in members:
        payload.extend(member[2:])
    header = Bundle(commands=b"".join(member[0] for member in members),
                    headers=[bytes(member[1]) for member in members],
                    counts=[len(member) - 2 for member in members])
    return [TAG, BUNDLE, _encoder.encode(header), *payload]


def decode_all(frames: Sequence[Any], accept: frozenset[bytes]) -> list[Message | Malformed]:
    """A message, or each member of a BUNDLE decoded on its own (a malformed member is a
    Malformed in its place, its neighbours unharmed; members may not be BUNDLEs). Raises
    ProtocolError when the message itself is malformed."""
    message = decode(frames, accept)
    if message.command != BUNDLE:
        return [message]
    header: Bundle = message.header
    inner = accept - {BUNDLE}
    members: list[Message | Malformed] = []
    payload = message.frames
    start = 0
    for command, raw, count in zip(header.commands, header.headers, header.counts):
        end = start + count
        try:
            members.append(_decode_member(_COMMANDS[command], raw, payload[start:end], inner))
        except ProtocolError as exc:
            members.append(Malformed(header_id(raw), exc))
        start = end
    return members


def decode_header(command: bytes, frame: Any) -> Any:
    try:
        return _DECODERS[command].decode(frame)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ProtocolError(f"bad header: {exc}") from exc


def _decode_body(frames: Sequence[Any], start: int, end: int, accept: frozenset[bytes]) -> Message:
    """``frames[start:end]``: command, header, payload (a message after its tag)."""
    if end - start < 2:
        raise ProtocolError(f"a message needs a command and a header, got {end - start} frames")
    return _decode_member(bytes(frames[start]), frames[start + 1], list(frames[start + 2:end]), accept)


def _decode_member(command: bytes, header_frame: Any, payload: list[Any], accept: frozenset[bytes]) -> Message:
    """One message from its command, header frame and payload frames (alone, or a BUNDLE's member)."""
    if command not in accept:
        raise ProtocolError(f"command {command!r} is not one this socket takes")
    header = decode_header(command, header_frame)
    if header.frame_count() != len(payload):
        raise ProtocolError(f"the header announces {header.frame_count()} payload frames, {len(payload)} came")
    return Message(command, header, payload, header_frame)


def salvage_id(frames: Sequence[Any]) -> int | None:
    """The ``id`` of a message that failed to decode, if one can be read, to answer it."""
    return header_id(frames[2]) if len(frames) >= 3 else None


def header_id(frame: Any) -> int | None:
    """The ``id`` in a header frame, whatever else it holds, or None."""
    try:
        found: _IdOnly = _id_only.decode(frame)
        return found.id
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
