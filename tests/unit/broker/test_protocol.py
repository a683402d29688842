"""The wire format, checked against frames written by hand (not by tfbroker/wire/protocol.py), and
fuzzed: whatever arrives, decode answers a typed message or ProtocolError, nothing else."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tfbroker.wire import protocol, tensors
from tfbroker.wire.errors import ProtocolError

# A REQUEST as a peer in another language would write it: msgpack map written byte by byte.
#   {"id": 7, "model": "m", "timeout_ms": 100, "inputs": [["x", "float32", [2]]]}
HAND_HEADER = (b"\x84"                                  # map of 4
               b"\xa2id\x07"                            # "id": 7
               b"\xa5model\xa1m"                        # "model": "m"
               b"\xaatimeout_ms\x64"                    # "timeout_ms": 100
               b"\xa6inputs\x91\x93\xa1x\xa7float32\x91\x02")  # "inputs": [["x", "float32", [2]]]
HAND_TENSOR = np.array([1.5, -2.0], dtype="<f4").tobytes()


def test_decodes_a_hand_written_request() -> None:
    message = protocol.decode([b"TFB05", b"\x01", HAND_HEADER, HAND_TENSOR], protocol.CLIENT_TO_BROKER)
    assert message.command == protocol.REQUEST
    header = message.header
    assert (header.id, header.model, header.timeout_ms, header.signature, header.version) == (
        7, "m", 100, "serving_default", None)
    assert header.inputs == [protocol.TensorSpec("x", "float32", (2,))]
    decoded = tensors.decode_tensors(header.inputs, message.frames)
    np.testing.assert_array_equal(decoded["x"], [1.5, -2.0])


def test_encodes_what_a_hand_written_peer_expects() -> None:
    specs, frames = tensors.encode_tensors({"x": np.array([1.5, -2.0], np.float32)})
    header = protocol.Request(id=7, model="m", timeout_ms=100, inputs=specs)
    encoded = protocol.encode(protocol.REQUEST, header, frames)
    assert encoded[:3] == [b"TFB05", b"\x01", HAND_HEADER]  # defaults (signature) are left out
    assert bytes(encoded[3]) == HAND_TENSOR


def test_numeric_tensors_are_not_copied() -> None:
    array = np.arange(6, dtype=np.int64).reshape(2, 3)
    _, frames = tensors.encode_tensors({"a": array})
    assert np.shares_memory(np.frombuffer(frames[0], dtype=np.int64), array)


@pytest.mark.parametrize("array", [
    np.arange(12, dtype=np.float32).reshape(3, 4),
    np.array([True, False]),
    np.zeros((0, 5), np.float64),
    np.array(3, np.int32),
    np.array([[b"ab", b""], [b"\xff\x00", b"z"]], dtype=object),
])
def test_tensors_round_trip(array: np.ndarray) -> None:
    specs, frames = tensors.encode_tensors({"t": array})
    [back] = tensors.decode_tensors(specs, [bytes(f) for f in frames]).values()
    assert back.shape == array.shape
    assert back.tolist() == array.tolist()


def header(**fields: object) -> bytes:
    return msgpack.packb(fields)


@pytest.mark.parametrize(("frames", "accept", "problem"), [
    ([b"TFB05", b"\x01"], protocol.CLIENT_TO_BROKER, "at least 3 frames"),
    ([b"TFB01", b"\x01", b"\x80"], protocol.CLIENT_TO_BROKER, "protocol tag"),
    ([b"TFB05", b"\x7f", b"\x80"], protocol.CLIENT_TO_BROKER, "not one this socket takes"),
    ([b"TFB05", protocol.BATCH, b"\x80"], protocol.CLIENT_TO_BROKER, "not one this socket takes"),
    ([b"TFB05", b"\x01", b"\x91\x01"], protocol.CLIENT_TO_BROKER, "bad header"),
    ([b"TFB05", b"\x01", b"\xc1"], protocol.CLIENT_TO_BROKER, "bad header"),
    ([b"TFB05", b"\x01", header(id=-1, model="m", timeout_ms=1, inputs=[])], protocol.CLIENT_TO_BROKER,
     r"\$\.id"),
    ([b"TFB05", b"\x01", header(id=1, model="m", timeout_ms=0, inputs=[])], protocol.CLIENT_TO_BROKER,
     r"\$\.timeout_ms"),
    ([b"TFB05", b"\x01", header(id=1, model="", timeout_ms=1, inputs=[])], protocol.CLIENT_TO_BROKER,
     r"\$\.model"),
    ([b"TFB05", b"\x01", header(id=1, model="m", timeout_ms=1, version=1 << 63, inputs=[])],
     protocol.CLIENT_TO_BROKER, r"\$\.version"),
    ([b"TFB05", b"\x01", header(id=1, model="m", timeout_ms=1, inputs=[["x", "object", [1]]])],
     protocol.CLIENT_TO_BROKER, r"inputs\[0\]"),
    ([b"TFB05", b"\x01", header(id=1, model="m", timeout_ms=1, inputs=[["x", "float32", [-1]]])],
     protocol.CLIENT_TO_BROKER, r"inputs\[0\]"),
    ([b"TFB05", b"\x01", header(id=1, model="m", timeout_ms=1, inputs=[["x", "float32", [1] * 33]])],
     protocol.CLIENT_TO_BROKER, r"inputs\[0\]"),
    ([b"TFB05", b"\x01", header(id=1, model="m", timeout_ms=1, inputs=[["x", "float32", [1]]])],
     protocol.CLIENT_TO_BROKER, "announces 1 payload frames, 0 came"),
    ([b"TFB05", protocol.BATCH, header(kind="t", batch=1, signature="s", counts=[1, 1], timeouts_ms=[5])],
     protocol.BROKER_TO_WORKER, "equally long"),
    ([b"TFB05", protocol.BATCH, header(kind="j", batch=1, signature="s", ids=[1], rows=[2], timeouts_ms=[5],
                                       inputs=[["x", "float32", [3]]]), b""],
     protocol.BROKER_TO_WORKER, "batch dimension of 2 rows"),
    ([b"TFB05", protocol.RESULT, header(kind="?", batch=1)], protocol.WORKER_TO_BROKER, "bad header"),
    ([b"TFB05", protocol.BATCH, header(kind="l", batch=1, model="m", version=1, counts=[2], timeouts_ms=[5],
                                       inputs=[["w", "string", [1]]]), b""],
     protocol.BROKER_TO_IOBATCHER, "counts must add up"),
    ([b"TFB05", protocol.RESULT, header(kind="l", batch=1, counts=[0], outputs=[], failures=[[3, 400, "x"]])],
     protocol.WORKER_TO_BROKER, "failures name tasks"),
    ([b"TFB05", protocol.LOADED, header(model="m", version=1, lookups=[["w", "float32", "ids", "int64", 0]])],
     protocol.WORKER_TO_BROKER, r"lookups\[0\]"),
    ([b"TFB05", protocol.LOAD, header(model="m", version=1, path="/p")], protocol.BROKER_TO_WORKER,
     "not one this socket takes"),
])
def test_malformed_messages_are_rejected(frames: list[bytes], accept: frozenset[bytes], problem: str) -> None:
    with pytest.raises(ProtocolError, match=problem):
        protocol.decode(frames, accept)


def test_lookup_messages_round_trip() -> None:
    batch = protocol.LookupBatch(batch=7, model="m", version=2, counts=[1, 0], timeouts_ms=[5, 9],
                                 inputs=[protocol.TensorSpec("w", "string", (2,))])
    result = protocol.LookupResult(batch=7, counts=[1, 0], outputs=[protocol.TensorSpec("ids", "int64", (2,))],
                                   failures=[protocol.LookupFailure(1, 503, "store down")], keys=2, unique_keys=1)
    loaded = protocol.TablesLoaded(model="m", version=2, lookups=[protocol.LookupSpec("w", "string", "ids", "int64", 0)])
    for command, message, accept in ((protocol.BATCH, batch, protocol.BROKER_TO_IOBATCHER),
                                     (protocol.RESULT, result, protocol.WORKER_TO_BROKER),
                                     (protocol.LOADED, loaded, protocol.WORKER_TO_BROKER),
                                     (protocol.READY, protocol.IoReady(pid=5), protocol.WORKER_TO_BROKER)):
        frames = protocol.encode(command, message, [b"x"] * message.frame_count())
        assert protocol.decode(frames, accept).header == message


def test_the_id_of_a_malformed_request_is_salvaged_to_answer_it() -> None:
    frames = [b"TFB05", b"\x01", header(id=9, model="", timeout_ms=1, inputs=[])]
    assert protocol.salvage_id(frames) == 9
    assert protocol.salvage_id([b"TFB05", b"\x01", b"\xc1"]) is None


def test_tensor_frames_must_fill_their_shape() -> None:
    spec = protocol.TensorSpec
    with pytest.raises(ProtocolError, match="'x'"):
        tensors.decode_tensors([spec("x", "float32", (3,))], [b"\x00" * 8])
    with pytest.raises(ProtocolError, match="2 tensor specs but 1 frames"):
        tensors.decode_tensors([spec("x", "float32", (1,)), spec("y", "float32", (1,))], [b"\x00" * 4])
    with pytest.raises(ProtocolError, match="2 strings do not fill"):
        tensors.decode_tensors([spec("s", "string", (3,))], [msgpack.packb([b"a", b"b"])])
    with pytest.raises(ProtocolError, match="appears twice"):
        tensors.decode_tensors([spec("x", "float32", (1,))] * 2, [b"\x00" * 4] * 2)


@pytest.mark.parametrize(("source", "target", "allowed"), [
    ("float64", "float32", True), ("int64", "float32", True), ("float32", "int64", False),
    ("string", "float32", False), ("string", "string", True), ("bool", "bool", True),
])
def test_can_cast(source: str, target: str, allowed: bool) -> None:
    assert tensors.can_cast(source, target) is allowed


# --- fuzzing ---

msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1) | st.floats() | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["id", "model", "inputs", "kind", "batch", "counts", "rows", "ids", "timeouts_ms",
                         "timeout_ms", "signature", "outputs", "version", "label", "x", "failures", "lookups",
                         "path", "pid"]), children, max_size=6),
    max_leaves=20)
commands = st.sampled_from(sorted(protocol.HEADER_TYPES)) | st.binary(min_size=0, max_size=2)
sockets = st.sampled_from([protocol.CLIENT_TO_BROKER, protocol.WORKER_TO_BROKER, protocol.BROKER_TO_WORKER,
                           protocol.BROKER_TO_CLIENT, protocol.CTL_TO_BROKER, protocol.BROKER_TO_IOBATCHER])


@settings(max_examples=400, deadline=None)
@given(commands, msgpack_values, st.lists(st.binary(max_size=16), max_size=3), sockets)
def test_decode_raises_only_protocol_errors(command: bytes, value: object, payload: list[bytes],
                                            accept: frozenset[bytes]) -> None:
    frames = [protocol.TAG, command, msgpack.packb(value), *payload]
    try:
        message = protocol.decode(frames, accept)
    except ProtocolError:
        return
    assert message.command in accept
    assert message.header.frame_count() == len(message.frames)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), min_size=0, max_size=5), sockets)
def test_decode_of_arbitrary_frames_raises_only_protocol_errors(frames: list[bytes], accept: frozenset[bytes]) -> None:
    try:
        protocol.decode(frames, accept)
    except ProtocolError:
        pass
    assert protocol.salvage_id(frames) is None or protocol.salvage_id(frames) >= 0
