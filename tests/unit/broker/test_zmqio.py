"""The hot-path multipart calls against pyzmq's own, on real sockets."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import pytest
import zmq

from tfbroker.wire.zmqio import NOBLOCK, POLLIN, POLLOUT, events, recv_message, send_message


@pytest.fixture
def pair() -> Iterator[tuple[zmq.Socket, zmq.Socket]]:
    context = zmq.Context()
    a, b = context.socket(zmq.PAIR), context.socket(zmq.PAIR)
    a.bind("inproc://zmqio")
    b.connect("inproc://zmqio")
    try:
        yield a, b
    finally:
        context.destroy(linger=0)


def test_a_message_arrives_whole_and_in_order(pair: tuple[zmq.Socket, zmq.Socket]) -> None:
    a, b = pair
    tensor = np.arange(6, dtype=np.float32)
    frame = zmq.Frame(b"frame")
    for copy in (True, False):
        send_message(a, [b"TFB01", b"\x02", memoryview(tensor).cast("B"), frame, b""], NOBLOCK, copy=copy)
        assert b.poll(1000)
        assert recv_message(b, NOBLOCK) == [b"TFB01", b"\x02", tensor.tobytes(), b"frame", b""]
    send_message(a, [b"one"])
    assert b.recv_multipart() == [b"one"], "pyzmq reads what send_message wrote"
    a.send_multipart([b"x", b"y"])
    assert b.poll(1000) and recv_message(b) == [b"x", b"y"], "and the other way round"


def test_events_and_nonblocking_calls(pair: tuple[zmq.Socket, zmq.Socket]) -> None:
    a, b = pair
    assert events(b) & POLLOUT and not events(b) & POLLIN
    with pytest.raises(zmq.Again):
        recv_message(b, NOBLOCK)
    send_message(a, [b"x"])
    assert b.poll(1000) and events(b) & POLLIN
    assert recv_message(b, zmq.NOBLOCK) == [b"x"], "pyzmq's flag enums are accepted too"
