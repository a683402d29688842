"""The owner of the broker's requests, without sockets: admission, cancel, expiry, requeue, failure."""

from __future__ import annotations

from broker.inflight import InFlight
from tests.unit.broker.shell import BATCHING, Wire, add_link, admit, model_with, request
from tfbroker.wire.errors import Unavailable

CLIENT = b"client-1"


def make() -> tuple[InFlight, Wire]:
    wire = Wire()
    return InFlight(wire.send_frontend, BATCHING, enable_batching=True, max_timeout_ms=30_000), wire


def test_admission_pins_the_request_to_the_newest_available_version_and_queues_it() -> None:
    inflight, wire = make()
    model, old = model_with(1)
    _, new = model_with(2)
    model.versions[2] = new
    admit(inflight, {"m": model}, CLIENT, 7, now=0.0, rows=3)
    assert not wire.to_clients  # nothing to say until the result
    assert len(new.queues["serving_default"]) == 1 and not old.queues
    [task] = new.queues["serving_default"].drain()
    assert (task.size, task.payload.client, task.payload.request_id) == (3, CLIENT, 7)
    assert task.payload.join_key == (("x", "float32", (2,)),)  # numeric inputs: may travel joined
    assert inflight.counters["requests"] == 1


def test_admission_refuses_with_the_right_status_and_queues_nothing() -> None:
    inflight, wire = make()
    model, served = model_with(1)
    models = {"m": model}
    admit(inflight, models, CLIENT, 1, now=0.0, model="nope")  # unknown model
    admit(inflight, models, CLIENT, 2, now=0.0, version=9)  # unknown version
    admit(inflight, models, CLIENT, 3, now=0.0, name="z")  # not an input of the signature
    header, frames = request(4)
    inflight.admit(CLIENT, header, frames[:1], models, lambda s, sig: None, 0.0)  # its tensor frame missing
    assert wire.errors() == [(CLIENT, 1, 404), (CLIENT, 2, 404), (CLIENT, 3, 400), (CLIENT, 4, 400)]
    assert not served.queues.get("serving_default")
    assert inflight.counters["requests"] == 0


def test_a_version_still_loading_answers_503_and_counts_a_rejection() -> None:
    inflight, wire = make()
    model, _ = model_with(1, state="loading")
    admit(inflight, {"m": model}, CLIENT, 1, now=0.0)
    assert wire.errors() == [(CLIENT, 1, 503)]
    assert inflight.counters["rejected"] == 1


def test_a_full_queue_answers_503_at_once() -> None:
    inflight, wire = make()
    model, served = model_with(1)
    for request_id in range(1, 4):  # max_enqueued_batches=2 of 8 rows
        admit(inflight, {"m": model}, CLIENT, request_id, now=0.0, rows=8)
    assert wire.errors() == [(CLIENT, 3, 503)]
    assert (served.counters.rejected, inflight.counters["rejected"]) == (1, 1)


def test_a_request_id_queued_twice_on_one_connection_is_refused() -> None:
    inflight, wire = make()
    model, _ = model_with(1)
    admit(inflight, {"m": model}, CLIENT, 5, now=0.0)
    admit(inflight, {"m": model}, CLIENT, 5, now=0.0)
    admit(inflight, {"m": model}, b"client-2", 5, now=0.0)  # another connection's 5 is another request
    assert wire.errors() == [(CLIENT, 5, 400)]


def test_cancel_removes_a_queued_request_and_answers_499_once() -> None:
    inflight, wire = make()
    model, served = model_with(1)
    admit(inflight, {"m": model}, CLIENT, 1, now=0.0)
    admit(inflight, {"m": model}, CLIENT, 2, now=0.0)
    inflight.cancel(CLIENT, 1)
    inflight.cancel(CLIENT, 1)  # again: nothing left to cancel
    inflight.cancel(CLIENT, 99)  # never queued
    assert wire.errors() == [(CLIENT, 1, 499)]
    assert [t.payload.request_id for t in served.queues["serving_default"].drain()] == [2]
    assert inflight.counters["cancelled"] == 1


def test_take_live_answers_504_for_the_overdue_and_makes_the_rest_uncancellable() -> None:
    inflight, wire = make()
    model, served = model_with(1)
    admit(inflight, {"m": model}, CLIENT, 1, now=0.0, timeout_s=0.01)
    admit(inflight, {"m": model}, CLIENT, 2, now=0.0, timeout_s=10)
    batch = served.queues["serving_default"].next_batch(1.0, idle=True)
    assert batch is not None
    live = inflight.take_live(batch.tasks, now=1.0)
    assert [t.payload.request_id for t in live] == [2]
    assert wire.errors() == [(CLIENT, 1, 504)]
    inflight.cancel(CLIENT, 2)  # dispatched: too late to cancel
    assert wire.errors() == []
    assert inflight.counters["expired"] == 1


def test_the_deadline_is_the_smaller_of_the_clients_and_the_servers() -> None:
    inflight, _ = make()
    inflight = InFlight(Wire().send_frontend, BATCHING, enable_batching=True, max_timeout_ms=500)
    model, served = model_with(1)
    admit(inflight, {"m": model}, CLIENT, 1, now=10.0, timeout_s=60)
    admit(inflight, {"m": model}, CLIENT, 2, now=10.0, timeout_s=0.2)
    assert [t.deadline for t in served.queues["serving_default"].drain()] == [10.5, 10.2]


def test_requeue_puts_a_lost_replicas_batches_back_once_then_fails_them() -> None:
    inflight, wire = make()
    model, served = model_with(1)
    link = add_link(served)
    for request_id in (1, 2):
        admit(inflight, {"m": model}, CLIENT, request_id, now=0.0)
    queue_ = served.queues["serving_default"]
    batch = queue_.next_batch(0.0, idle=True)
    assert batch is not None
    link.in_flight[1] = ("serving_default", inflight.take_live(batch.tasks, 0.0))
    inflight.requeue(served, link)
    assert not link.in_flight and len(queue_) == 2 and inflight.counters["requeued"] == 2
    inflight.cancel(CLIENT, 1)  # requeued: cancellable again
    assert wire.errors() == [(CLIENT, 1, 499)]
    batch = queue_.next_batch(0.0, idle=True)
    assert batch is not None
    link.in_flight[2] = ("serving_default", inflight.take_live(batch.tasks, 0.0))
    inflight.requeue(served, link)  # a second loss: the request has had its second chance
    assert wire.errors() == [(CLIENT, 2, 503)]
    assert len(queue_) == 0


def test_fail_version_answers_every_stage_of_that_version() -> None:
    inflight, wire = make()
    model, served = model_with(1)
    link = add_link(served)
    for request_id in (1, 2, 3):
        admit(inflight, {"m": model}, CLIENT, request_id, now=0.0, rows=8)
    batch = served.queues["serving_default"].next_batch(0.0, idle=True)
    assert batch is not None
    link.in_flight[1] = ("serving_default", inflight.take_live(batch.tasks, 0.0))
    inflight.fail_version(served, Unavailable("the server is shutting down"))
    assert sorted(wire.errors()) == [(CLIENT, 1, 503), (CLIENT, 2, 503), (CLIENT, 3, 503)]
    assert not served.has_work()


def test_requests_alike_in_one_message_are_resolved_once_and_still_checked_each() -> None:
    inflight, wire = make()
    model, served = model_with(1)
    models = {"m": model}
    alike: dict[object, object] = {}
    for request_id, model_name in ((1, "m"), (2, "m"), (3, "nope"), (4, "m")):
        header, frames = request(request_id, model=model_name)
        if request_id == 4:
            frames = [frames[0], frames[1][:4]]  # the header says 2 floats, the frame holds one
        inflight.admit(b"a", header, frames, models, lambda served, signature: None, 0.0, alike)
    assert len(alike) == 1, "one kind of request"
    assert sorted((request_id, code) for _, request_id, code in wire.errors()) == [(3, 404), (4, 400)]
    assert len(served.queues["serving_default"]) == 2


def run_next(inflight: InFlight, served: object, link: object, batch_id: int, *, idle: bool = True) -> list[int]:
    """Hand the queue's next batch to ``link``, as the dispatcher does; the request ids in it."""
    queue_ = served.queues["serving_default"]  # type: ignore[attr-defined]
    batch = queue_.next_batch(0.0, idle=idle)
    assert batch is not None
    link.in_flight[batch_id] = ("serving_default", inflight.take_live(batch.tasks, 0.0))  # type: ignore[attr-defined]
    return [t.payload.request_id for t in batch.tasks]


def test_the_requests_of_a_batch_whose_worker_died_of_a_fault_run_alone_until_the_one_that_kills_is_found() -> None:
    inflight, wire = make()
    model, served = model_with(1)
    link = add_link(served)
    for request_id in (1, 2, 3, 4):
        admit(inflight, {"m": model}, CLIENT, request_id, now=0.0)
    assert run_next(inflight, served, link, 1) == [1, 2, 3, 4]
    inflight.isolate(served, link, now=0.0)  # died running 1-4 (3 is the poison)
    queue_ = served.queues["serving_default"]
    assert queue_.next_batch(0.0, idle=False) is None, "a suspect request runs only on an idle worker"
    for batch_id, request_id in ((2, 1), (3, 2)):
        assert run_next(inflight, served, link, batch_id) == [request_id]
        link.in_flight.clear()  # answered: it was not the one
    assert run_next(inflight, served, link, 4) == [3]
    inflight.isolate(served, link, now=0.0)  # alone, and it died again: 3 is the one
    [(client, killed)] = wire.answers()
    assert (client, killed.header.id, killed.header.code) == (CLIENT, 3, 400)
    assert killed.header.message == "the model's process died on this request"
    assert run_next(inflight, served, link, 5) == [4]
    assert inflight.counters["killed_worker"] == 1 and inflight.counters["isolated"] == 4

    # The same content again is refused at admission (the request's id is not part of it);
    # other content is not.
    admit(inflight, {"m": model}, b"client-2", 3, now=1.0)
    admit(inflight, {"m": model}, CLIENT, 7, now=1.0)
    [(client, refused)] = wire.answers()
    assert (client, refused.header.id, refused.header.code) == (b"client-2", 3, 400)
    assert refused.header.message.startswith("the model's process died on this request earlier: it is refused for")
    assert inflight.counters["refused_poison"] == 1
    assert len(served.queues["serving_default"]) == 1
