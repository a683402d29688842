"""Coalesced messages without sockets: BUNDLE and RowsReply codecs, the broker's outbox, and
a batch's answers grouped per client."""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np
import pytest

from broker.dispatch import Dispatcher
from broker.inflight import InFlight
from broker.outbox import Outbox
from tests.unit.broker.shell import BATCHING, Wire, add_link, admit, model_with
from tfbroker.client import encode_predict, prediction, read_answers
from tfbroker.wire import protocol
from tfbroker.wire.errors import Internal, ProtocolError


def predict_member(request_id: int, value: float = 1.0) -> list[Any]:
    return encode_predict(request_id, "m", {"x": np.array([value], np.float32)}, version=None, label=None,
                          signature_name="serving_default", timeout_s=5)[1:]


def test_a_lone_member_travels_as_itself() -> None:
    frames = protocol.bundle([predict_member(1)])
    assert frames[:2] == [protocol.TAG, protocol.REQUEST]
    [message] = protocol.decode_all(frames, protocol.CLIENT_TO_BROKER)
    assert isinstance(message, protocol.Message) and message.header.id == 1


def test_a_malformed_member_fails_alone() -> None:
    bad_header = [protocol.CANCEL, b"\x91"]                             # not a map
    wrong_frames = [*predict_member(3)[:2]]                             # its tensor frame missing
    nested = [protocol.BUNDLE, protocol.encode_header(protocol.Bundle(commands=b"", headers=[], counts=[]))]
    members = protocol.decode_all(protocol.bundle([predict_member(1), bad_header, wrong_frames, nested,
                                                   predict_member(5)]), protocol.CLIENT_TO_BROKER)
    assert [type(m).__name__ for m in members] == ["Message", "Malformed", "Malformed", "Malformed", "Message"]
    assert (members[0].header.id, members[4].header.id) == (1, 5)
    assert members[2].id == 3, "a readable id is kept, to answer it"
    assert "not one this socket takes" in str(members[3].error)


def test_a_bundle_whose_counts_do_not_add_up_is_refused_whole() -> None:
    frames = protocol.bundle([predict_member(1), predict_member(2)])
    with pytest.raises(ProtocolError):
        protocol.decode_all(frames[:-1], protocol.CLIENT_TO_BROKER)
    header = msgpack.packb({"commands": protocol.REQUEST * 2, "headers": [b"\x80"], "counts": [1, 1]})
    with pytest.raises(ProtocolError, match="one each per member"):
        protocol.decode_all([protocol.TAG, protocol.BUNDLE, header, b"", b""], protocol.CLIENT_TO_BROKER)


def test_a_bundle_carries_its_members_headers_in_its_own_header() -> None:
    """Three frames a request became one: the headers ride in the BUNDLE's header."""
    members = [predict_member(1), predict_member(2, 2.0), [protocol.CANCEL, protocol.encode_header(protocol.Cancel(id=7))]]
    frames = protocol.bundle(members)
    assert len(frames) == 3 + 2, "the tag, BUNDLE, its header, one tensor frame per request"
    decoded = protocol.decode_all(frames, protocol.CLIENT_TO_BROKER)
    assert [(m.command, m.header.id) for m in decoded] == [(protocol.REQUEST, 1), (protocol.REQUEST, 2), (protocol.CANCEL, 7)]
    assert np.frombuffer(decoded[1].frames[0], np.float32).tolist() == [2.0]
    assert decoded[0].header_frame == members[0][1], "the header as the client sent it, to forward"


def test_a_rows_reply_is_cut_per_request_without_copying() -> None:
    y = np.arange(12, dtype=np.float32).reshape(6, 2)
    header = protocol.RowsReply(ids=[7, 8, 9], rows=[1, 3, 2], model="m", version=4,
                                outputs=[protocol.TensorSpec("y", "float32", (6, 2))])
    frame = y.tobytes()
    answers = dict(read_answers([protocol.TAG, protocol.REPLY, protocol.encode_header(header), frame]))
    assert sorted(answers) == [7, 8, 9]
    got = {i: prediction(answers[i]).outputs["y"] for i in answers}  # type: ignore[arg-type]
    assert got[7].tolist() == y[:1].tolist() and got[8].tolist() == y[1:4].tolist() and got[9].tolist() == y[4:].tolist()
    assert got[8].base is not None and got[8].base is got[9].base, "views of the one frame, not copies"
    assert prediction(answers[8]).version == 4  # type: ignore[arg-type]


def test_a_rows_reply_whose_frame_does_not_fill_its_rows_fails_each_of_its_requests() -> None:
    header = protocol.RowsReply(ids=[7, 8], rows=[1, 2], model="m", version=4,
                                outputs=[protocol.TensorSpec("y", "float32", (3, 2))])
    answers = dict(read_answers([protocol.TAG, protocol.REPLY, protocol.encode_header(header), b"\0" * 20]))
    assert sorted(answers) == [7, 8] and all(isinstance(a, Internal) and "malformed" in str(a) for a in answers.values())


@pytest.mark.parametrize("ids, rows, shape", [([1, 2], [1], (1, 2)), ([1, 2], [1, 1], (3, 2)), ([1], [1], ())])
def test_a_rows_reply_that_does_not_add_up_is_malformed(ids: list[int], rows: list[int], shape: tuple[int, ...]) -> None:
    body = {"kind": "r", "ids": ids, "rows": rows, "model": "m", "version": 1, "outputs": [["y", "float32", list(shape)]]}
    with pytest.raises(ProtocolError):
        protocol.decode([protocol.TAG, protocol.REPLY, msgpack.packb(body), b"\x00" * 24], protocol.BROKER_TO_CLIENT)


def test_the_outbox_sends_one_message_per_client_per_turn() -> None:
    sent: list[list[Any]] = []
    outbox = Outbox(sent.append)
    error = [protocol.ERROR, protocol.encode_header(protocol.Error(id=1, code=404, message="no"))]
    outbox.add(b"a", error)
    outbox.add(b"b", error)
    outbox.add(b"a", error)
    assert sent == [] and len(outbox) == 3
    outbox.flush()
    assert [frames[0] for frames in sent] == [b"a", b"b"]
    assert sent[0][2] == protocol.BUNDLE and len(protocol.decode_all(sent[0][1:], protocol.BROKER_TO_CLIENT)) == 2
    assert sent[1][1:] == [protocol.TAG, *error], "a lone answer goes as itself"
    outbox.flush()
    assert len(sent) == 2, "nothing is sent twice"


def test_a_batch_answers_each_client_once_with_its_rows() -> None:
    wire = Wire()
    inflight = InFlight(wire.send_frontend, BATCHING, enable_batching=True, max_timeout_ms=30_000)
    dispatcher = Dispatcher(inflight, wire.send_backend, BATCHING, batches_in_flight=2)
    model, served = model_with(1)
    link = add_link(served)
    for client, request_id, rows in ((b"a", 1, 1), (b"b", 2, 2), (b"a", 3, 2)):
        admit(inflight, {"m": model}, client, request_id, now=0.0, rows=rows)
    dispatcher.dispatch([served], now=0.0)
    [(_, _, batch, frames)] = wire.to_workers
    assert batch.ids == [1, 3, 2], "grouped by client, so each client's rows are one run"
    x = np.frombuffer(frames[0], np.float32).reshape(5, 2)
    result = protocol.JoinedResult(batch=batch.batch, model="m", version=1,
                                   outputs=[protocol.TensorSpec("y", "float32", (5, 2))])
    assert dispatcher.deliver(link, protocol.Message(protocol.RESULT, result, [(x * 10).tobytes()]))
    assert [frames[0] for frames in wire.to_clients] == [b"a", b"b"]
    assert protocol.decode(wire.to_clients[0][1:], protocol.BROKER_TO_CLIENT).header.ids == [1, 3]
    answers = {m.header.id: np.frombuffer(m.frames[0], np.float32) for _, m in wire.answers()}
    assert answers[1].tolist() == (x[0] * 10).tolist()
    assert answers[3].tolist() == (x[1:3] * 10).reshape(-1).tolist()
    assert answers[2].tolist() == (x[3:] * 10).reshape(-1).tolist()
