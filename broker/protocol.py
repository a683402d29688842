"""The tfbroker wire protocol (TFB/1): frontends, broker and workers over ZeroMQ.

Depends only on the standard library, msgpack and numpy, so frontends import it without
TensorFlow. Every message, in both directions, is a multipart ZeroMQ message:

    Frame 0   b"TFB01"                 protocol tag and version; a peer with another tag
                                       is rejected on its first message
    Frame 1   one byte                 command (below)
    Frame 2   msgpack map              the header (small values only)
    Frame 3…  raw bytes                payload: one frame per tensor, never pickled

A ROUTER socket sees the sender's identity frame in front of Frame 0. No empty delimiter
frame is used: every peer is a DEALER.

Tensors travel as a spec in the header plus one frame each. A spec is the list
``[name, dtype, shape]`` with ``dtype`` a numpy name ("float32", "int64", "bool", …) or
"string". Numeric frames are the C-contiguous buffer of the array (zero-copy on both sides);
a "string" frame is a msgpack array of byte strings. An input named "" is the
signature's only input (TF Serving's unnamed ``"instances": [1.0, 2.0]``).

Commands and their headers
--------------------------
Client (frontend or ``frontend.client``) to broker, on the broker's frontend ROUTER:

    REQUEST   {id, model, version?, label?, signature, timeout_ms, inputs: [spec…]}
              + one frame per input. ``version`` and ``label`` are optional: the latest
              available version serves when both are absent.
    METADATA  {id, model, version?, label?}
    STATUS    {id, model, version?, label?}
    STATS     {id}                     the broker's counters (monitoring, bench/)
    HEARTBEAT {}

Broker to client:

    REPLY     {id, model, version, outputs: [spec…]} + one frame per output      (REQUEST)
              {id, model, version, signature_def: {…}}                           (METADATA)
              {id, model, model_version_status: [{version, state, status}…]}     (STATUS)
              {id, requests, batches, rows, joined}                              (STATS)
    ERROR     {id, code, message}     ``code`` is the HTTP status (see broker/errors.py)
    HEARTBEAT {}                      the answer to a client's HEARTBEAT

Worker to broker, on the broker's backend ROUTER (the worker's identity is its own):

    READY      {model, version, pid, signatures: {name: {inputs: {n: [dtype, shape]},
               outputs: {…}}}, signature_def: {…}}   loaded and warmed up; send batches
    RESULT     {batch, counts: [n…]} then, per task in batch order, ``n`` frames that form a
               complete client message without the tag: ``[REPLY|ERROR, header, frames…]``
               or, for a joined BATCH whose outputs are all numeric and cut by rows:
               {batch, model, version, outputs: [spec…]} + one frame per output, the tasks'
               rows in batch order (the broker cuts them into one REPLY per task)
    HEARTBEAT  {}
    DISCONNECT {error?}                a worker going away (``error``: why it failed to load)

Broker to worker:

    BATCH      {batch, signature, padded_rows, counts: [n…]} then, per task, ``n`` frames:
               the task's REQUEST header exactly as the client sent it, then its tensors
               or, joined, when every task has the same numeric inputs (names, order, dtypes,
               inner shapes): {batch, signature, padded_rows, ids: [id…], rows: [n…],
               inputs: [spec…]} + one frame per input, the tasks' rows end to end
    HEARTBEAT  {}
    DISCONNECT {}                      stop after the batches in hand

Control client (``python -m broker.ctl``) to broker, on the broker's control ROUTER:

    CONTROL    {id, op, args: {model?, version?, label?}, token?}
               op: status | reload-config | load | unload | label | drain
    answered by REPLY {id, …} (``message`` or ``changes`` or the status) or ERROR {id, code, message}

Dialogs
-------
    C: REQUEST          B: REPLY | ERROR            one answer per id, or none if the
                                                    client's own deadline passes first
    W: READY            then repeat  B: BATCH  W: RESULT   (at most batches_in_flight
                                                    BATCHes unanswered per worker)
    any peer: HEARTBEAT whenever it has sent nothing for heartbeat_interval_s

Any message counts as a sign of life. A peer silent for interval × liveness is dead: the
broker fails a dead worker's batches with 503 at once and restarts it; a client fails its
pending requests with 503 and opens a fresh socket. A worker that hears nothing from the
broker reconnects and sends READY again.

Known weaknesses
----------------
- No authentication on the request and worker sockets: keep them on ipc:// or loopback, or
  on a private network. The control socket can require a shared token, sent in clear.
- A worker that runs one batch longer than interval × liveness is taken for dead: size
  the heartbeat settings above the slowest legitimate batch.
- ``id`` is unique per client socket only; the broker keys requests by (identity, id).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import msgpack
import numpy as np

from broker.errors import ProtocolError

TAG = b"TFB01"

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

COMMANDS = frozenset({REQUEST, REPLY, ERROR, METADATA, STATUS, HEARTBEAT, READY, BATCH, RESULT, DISCONNECT,
                      STATS, CONTROL})

STRING = "string"

Frame = bytes | memoryview


@dataclass(frozen=True, slots=True)
class Message:
    """A decoded message: its command, its header and its raw payload frames."""

    command: bytes
    header: dict[str, Any]
    frames: list[Any]


def encode(command: bytes, header: Mapping[str, Any], frames: Iterable[Any] = ()) -> list[Any]:
    """Frames for one message (without a ROUTER identity)."""
    return [TAG, command, packb(header), *frames]


def decode(frames: Sequence[Any]) -> Message:
    """Check the tag and command and unpack the header; raises ProtocolError."""
    if len(frames) < 3:
        raise ProtocolError(f"a message needs at least 3 frames, got {len(frames)}")
    tag, command = bytes(frames[0]), bytes(frames[1])
    if tag != TAG:
        raise ProtocolError(f"protocol tag {tag[:16]!r} is not {TAG!r}")
    if command not in COMMANDS:
        raise ProtocolError(f"unknown command {command!r}")
    header = unpackb(frames[2])
    if not isinstance(header, dict):
        raise ProtocolError("the header frame is not a msgpack map")
    return Message(command, header, list(frames[3:]))


def packb(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpackb(data: Any) -> Any:
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False)
    except (ValueError, msgpack.UnpackException) as exc:
        raise ProtocolError(f"bad msgpack: {exc}") from exc


# --- tensors -----------------------------------------------------------------------------

def encode_tensors(tensors: Mapping[str, np.ndarray]) -> tuple[list[list[Any]], list[Frame]]:
    """Specs and frames for named arrays; numeric buffers are not copied."""
    specs: list[list[Any]] = []
    frames: list[Frame] = []
    for name, array in tensors.items():
        if array.dtype.kind in "OSU":
            flat = [_as_bytes(v) for v in array.reshape(-1).tolist()]
            specs.append([name, STRING, list(array.shape)])
            frames.append(packb(flat))
        else:
            specs.append([name, array.dtype.name, list(array.shape)])
            if not array.flags.c_contiguous:
                array = array.copy()  # (np.ascontiguousarray would turn a scalar into shape [1])
            frames.append(memoryview(array).cast("B") if array.size and array.ndim else array.tobytes())
    return specs, frames


def decode_tensors(specs: Sequence[Any], frames: Sequence[Any]) -> dict[str, np.ndarray]:
    """Arrays from specs and frames; numeric arrays are read-only views of the frames."""
    if len(specs) != len(frames):
        raise ProtocolError(f"{len(specs)} tensor specs but {len(frames)} frames")
    tensors: dict[str, np.ndarray] = {}
    for spec, frame in zip(specs, frames):
        name, dtype, shape = spec
        shape = tuple(int(d) for d in shape)
        if dtype == STRING:
            values = unpackb(frame)
            array = np.empty(len(values), dtype=object)
            array[:] = values
            tensors[name] = array.reshape(shape)
        else:
            try:
                tensors[name] = np.frombuffer(frame, dtype=np.dtype(dtype)).reshape(shape)
            except (TypeError, ValueError) as exc:
                raise ProtocolError(f"tensor {name!r}: {exc}") from exc
    return tensors


def _as_bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    raise ProtocolError(f"string tensors hold bytes or str, not {type(value).__name__}")


# TensorFlow's DataType names (as in SignatureDefs and TF Serving's JSON) and ours.
DT_TO_DTYPE = {
    "DT_FLOAT": "float32", "DT_DOUBLE": "float64", "DT_HALF": "float16",
    "DT_INT8": "int8", "DT_INT16": "int16", "DT_INT32": "int32", "DT_INT64": "int64",
    "DT_UINT8": "uint8", "DT_UINT16": "uint16", "DT_UINT32": "uint32", "DT_UINT64": "uint64",
    "DT_BOOL": "bool", "DT_STRING": STRING,
}


def can_cast(source: str, target: str) -> bool:
    """Whether a request tensor of dtype ``source`` may feed an input of dtype ``target``.

    Numbers convert within their kind or upwards (JSON integers feed float inputs, float64
    feeds float32) as TF Serving's JSON parser does; strings only feed strings.
    """
    if source == target:
        return True
    if STRING in (source, target):
        return False
    return bool(np.can_cast(np.dtype(source), np.dtype(target), casting="same_kind"))
