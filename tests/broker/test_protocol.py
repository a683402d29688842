"""The wire format, checked against frames written by hand (not by broker/protocol.py)."""

from __future__ import annotations

import numpy as np
import pytest

from broker import protocol
from broker.errors import ProtocolError

# A REQUEST as a peer in another language would write it: msgpack map written byte by byte.
#   {"id": 7, "model": "m", "inputs": [["x", "float32", [2]]]}
HAND_HEADER = (b"\x83"                                  # map of 3
               b"\xa2id\x07"                            # "id": 7
               b"\xa5model\xa1m"                        # "model": "m"
               b"\xa6inputs\x91\x93\xa1x\xa7float32\x91\x02")  # "inputs": [["x", "float32", [2]]]
HAND_TENSOR = np.array([1.5, -2.0], dtype="<f4").tobytes()


def test_decodes_a_hand_written_request() -> None:
    message = protocol.decode([b"TFB01", b"\x01", HAND_HEADER, HAND_TENSOR])
    assert message.command == protocol.REQUEST
    assert message.header == {"id": 7, "model": "m", "inputs": [["x", "float32", [2]]]}
    tensors = protocol.decode_tensors(message.header["inputs"], message.frames)
    np.testing.assert_array_equal(tensors["x"], [1.5, -2.0])


def test_encodes_what_a_hand_written_peer_expects() -> None:
    specs, frames = protocol.encode_tensors({"x": np.array([1.5, -2.0], np.float32)})
    encoded = protocol.encode(protocol.REQUEST, {"id": 7, "model": "m", "inputs": specs}, frames)
    assert encoded[:3] == [b"TFB01", b"\x01", HAND_HEADER]
    assert bytes(encoded[3]) == HAND_TENSOR


def test_numeric_tensors_are_not_copied() -> None:
    array = np.arange(6, dtype=np.int64).reshape(2, 3)
    _, frames = protocol.encode_tensors({"a": array})
    assert np.shares_memory(np.frombuffer(frames[0], dtype=np.int64), array)


@pytest.mark.parametrize("array", [
    np.arange(12, dtype=np.float32).reshape(3, 4),
    np.array([True, False]),
    np.zeros((0, 5), np.float64),
    np.array(3, np.int32),
    np.array([[b"ab", b""], [b"\xff\x00", b"z"]], dtype=object),
])
def test_tensors_round_trip(array: np.ndarray) -> None:
    specs, frames = protocol.encode_tensors({"t": array})
    [back] = protocol.decode_tensors(specs, [bytes(f) for f in frames]).values()
    assert back.shape == array.shape
    assert back.tolist() == array.tolist()


@pytest.mark.parametrize(("frames", "problem"), [
    ([b"TFB01", b"\x01"], "at least 3 frames"),
    ([b"TFB02", b"\x01", b"\x80"], "protocol tag"),
    ([b"TFB01", b"\x7f", b"\x80"], "unknown command"),
    ([b"TFB01", b"\x01", b"\x91\x01"], "not a msgpack map"),
    ([b"TFB01", b"\x01", b"\xc1"], "bad msgpack"),
])
def test_malformed_messages_are_rejected(frames: list[bytes], problem: str) -> None:
    with pytest.raises(ProtocolError, match=problem):
        protocol.decode(frames)


def test_tensor_frames_must_fill_their_shape() -> None:
    with pytest.raises(ProtocolError, match="'x'"):
        protocol.decode_tensors([["x", "float32", [3]]], [b"\x00" * 8])
    with pytest.raises(ProtocolError, match="2 tensor specs but 1 frames"):
        protocol.decode_tensors([["x", "float32", [1]], ["y", "float32", [1]]], [b"\x00" * 4])


@pytest.mark.parametrize(("source", "target", "allowed"), [
    ("float64", "float32", True), ("int64", "float32", True), ("float32", "int64", False),
    ("string", "float32", False), ("string", "string", True), ("bool", "bool", True),
])
def test_can_cast(source: str, target: str, allowed: bool) -> None:
    assert protocol.can_cast(source, target) is allowed
