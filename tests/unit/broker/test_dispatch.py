"""Dispatch and delivery without sockets: batches to replicas, results cut back to clients."""

from __future__ import annotations

from typing import Any

import numpy as np

from broker import lifecycle as lc
from broker.config import BatchingParameters
from broker.dispatch import Dispatcher
from broker.inflight import InFlight
from tests.unit.broker.shell import BATCHING, Wire, add_link, admit, model_with
from tfbroker.wire import protocol, tensors
from tfbroker.wire.errors import Unavailable


def make(batching: BatchingParameters = BATCHING, slots: int = 2) -> tuple[InFlight, Dispatcher, Wire]:
    wire = Wire()
    inflight = InFlight(wire.send_frontend, batching, enable_batching=True, max_timeout_ms=30_000)
    return inflight, Dispatcher(inflight, wire.send_backend, batching, batches_in_flight=slots), wire


def test_requests_with_equal_inputs_travel_joined_to_an_idle_replica() -> None:
    inflight, dispatcher, wire = make()
    model, served = model_with(1)
    link = add_link(served)
    admit(inflight, {"m": model}, b"a", 1, now=0.0, rows=2)
    admit(inflight, {"m": model}, b"b", 2, now=0.0, rows=1)
    dispatcher.dispatch([served], now=0.0)
    [(identity, command, header, frames)] = wire.to_workers
    assert (identity, command) == (b"w0", protocol.BATCH)
    assert isinstance(header, protocol.JoinedBatch)
    assert (header.ids, header.rows, header.padded_rows) == ([1, 2], [2, 1], 3)
    assert header.inputs == [protocol.TensorSpec("x", "float32", (3, 2))]
    assert len(frames) == 1 and len(frames[0]) == 3 * 2 * 4  # one frame: the two requests' rows
    assert list(link.in_flight) == [header.batch] and link.batches == 1
    assert (inflight.counters["batches"], inflight.counters["rows"], inflight.counters["joined"]) == (1, 3, 1)


def test_a_batch_is_padded_to_the_next_allowed_size() -> None:
    batching = BatchingParameters(max_batch_size=8, batch_timeout_micros=0, allowed_batch_sizes=(4, 8))
    inflight, dispatcher, wire = make(batching)
    model, served = model_with(1)
    add_link(served)
    admit(inflight, {"m": model}, b"a", 1, now=0.0, rows=3)
    dispatcher.dispatch([served], now=0.0)
    assert wire.to_workers[0][2].padded_rows == 4


def test_each_batch_goes_to_the_least_loaded_ready_replica_within_its_slots() -> None:
    inflight, dispatcher, wire = make(BatchingParameters(max_batch_size=8, max_enqueued_batches=10), slots=1)
    model, served = model_with(1, replicas=3)
    first, second = add_link(served, 0), add_link(served, 1)
    add_link(served, 2)
    served.life.handle(lc.WorkerSilent("no heartbeat", replica=2))  # restarting: never sent a batch
    assert served.state.value == "AVAILABLE"
    for request_id in range(1, 4):  # three full batches of 8 rows
        admit(inflight, {"m": model}, b"a", request_id, now=0.0, rows=8)
    dispatcher.dispatch([served], now=0.0)
    assert [w[0] for w in wire.to_workers] == [b"w0", b"w1"]  # one slot each; the third batch waits
    assert len(served.queues["serving_default"]) == 1
    first.in_flight.clear()  # its result came back
    dispatcher.dispatch([served], now=0.0)
    assert [w[0] for w in wire.to_workers] == [b"w0", b"w1", b"w0"]
    assert len(second.in_flight) == 1


def test_an_overdue_request_is_answered_504_and_never_sent() -> None:
    inflight, dispatcher, wire = make()
    model, served = model_with(1)
    link = add_link(served)
    admit(inflight, {"m": model}, b"a", 1, now=0.0, timeout_s=0.001)
    dispatcher.dispatch([served], now=1.0)
    assert not wire.to_workers and not link.in_flight
    assert wire.errors() == [(b"a", 1, 504)]


def joined_result(batch: int, rows: int, values: np.ndarray) -> protocol.Message:
    header = protocol.JoinedResult(batch=batch, model="m", version=1,
                                   outputs=[protocol.TensorSpec("y", "float32", (rows, 2))])
    return protocol.Message(protocol.RESULT, header, [values.tobytes()])


def test_a_joined_result_is_cut_into_each_clients_reply() -> None:
    inflight, dispatcher, wire = make()
    model, served = model_with(1)
    link = add_link(served)
    admit(inflight, {"m": model}, b"a", 1, now=0.0, rows=2)
    admit(inflight, {"m": model}, b"b", 2, now=0.0, rows=1)
    dispatcher.dispatch([served], now=0.0)
    batch = wire.to_workers[0][2].batch
    y = np.arange(6, dtype=np.float32).reshape(3, 2)
    assert dispatcher.deliver(link, joined_result(batch, 3, y))
    answers = wire.answers()
    assert [client for client, _ in answers] == [b"a", b"b"]
    for (_, message), want in zip(answers, (y[:2], y[2:])):
        assert message.command == protocol.REPLY
        np.testing.assert_array_equal(tensors.decode_tensors(message.header.outputs, message.frames)["y"], want)
    assert not link.in_flight


def test_a_malformed_result_fails_its_requests_with_500_and_an_unknown_batch_changes_nothing() -> None:
    inflight, dispatcher, wire = make()
    model, served = model_with(1)
    link = add_link(served)
    admit(inflight, {"m": model}, b"a", 1, now=0.0, rows=2)
    dispatcher.dispatch([served], now=0.0)
    batch = wire.to_workers[0][2].batch
    assert not dispatcher.deliver(link, joined_result(batch + 1, 2, np.zeros((2, 2), np.float32)))
    assert not wire.to_clients and link.in_flight
    assert not dispatcher.deliver(link, joined_result(batch, 5, np.zeros((5, 2), np.float32)))  # 5 rows for 2
    assert wire.errors() == [(b"a", 1, 500)]
    assert inflight.counters["malformed_worker"] == 1 and not link.in_flight


def split_setup() -> tuple[InFlight, Dispatcher, Wire, Any, Any]:
    batching = BatchingParameters(max_batch_size=2, batch_timeout_micros=0, max_enqueued_batches=10)
    inflight, dispatcher, wire = make(batching, slots=5)
    model, served = model_with(1)
    return inflight, dispatcher, wire, model, served


def test_a_request_larger_than_a_batch_runs_in_parts_and_is_answered_whole_in_order() -> None:
    inflight, dispatcher, wire, model, served = split_setup()
    link = add_link(served)
    admit(inflight, {"m": model}, b"a", 7, now=0.0, rows=5)
    dispatcher.dispatch([served], now=0.0)
    batches = wire.to_workers
    assert [header.rows for _, _, header, _ in batches] == [[2], [2], [1]]
    assert [header.ids for _, _, header, _ in batches] == [[7], [7], [7]]
    x = np.arange(10, dtype=np.float32).reshape(5, 2) + 7  # what shell.request sent
    sent = np.concatenate([np.frombuffer(bytes(frames[0]), np.float32) for _, _, _, frames in batches])
    np.testing.assert_array_equal(sent.reshape(5, 2), x)
    for _, _, header, _ in reversed(batches):  # results come back in any order
        rows = header.rows[0]
        start = sum(h.rows[0] for _, _, h, _ in batches[:batches.index(next(b for b in batches if b[2] is header))])
        assert dispatcher.deliver(link, joined_result(header.batch, rows, x[start:start + rows] * 10))
    [(client, message)] = wire.answers()
    assert client == b"a" and message.command == protocol.REPLY and message.header.id == 7
    np.testing.assert_array_equal(tensors.decode_tensors(message.header.outputs, message.frames)["y"], x * 10)


def test_a_split_request_fails_once_and_is_cancelled_with_its_queued_parts() -> None:
    inflight, dispatcher, wire, model, served = split_setup()
    link = add_link(served)
    admit(inflight, {"m": model}, b"a", 1, now=0.0, rows=5)
    admit(inflight, {"m": model}, b"a", 2, now=0.0, rows=4)
    inflight.cancel(b"a", 2)  # nothing dispatched yet: every part leaves the queue, one 499
    assert wire.errors() == [(b"a", 2, 499)]
    assert sum(len(q) for q in served.queues.values()) == 3
    dispatcher.dispatch([served], now=0.0)
    inflight.fail(link.take_in_flight(), Unavailable("the worker died"))  # three parts, one answer
    assert wire.errors() == [(b"a", 1, 503)]


def test_a_split_request_the_queue_cannot_hold_whole_is_refused_whole() -> None:
    batching = BatchingParameters(max_batch_size=2, batch_timeout_micros=0, max_enqueued_batches=2)
    inflight, _, wire = make(batching)
    model, served = model_with(1)
    admit(inflight, {"m": model}, b"a", 1, now=0.0, rows=5)  # three parts, room for two
    assert wire.errors() == [(b"a", 1, 503)]
    assert sum(len(q) for q in served.queues.values()) == 0
