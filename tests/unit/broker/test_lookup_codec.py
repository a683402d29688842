"""The lookup stage's frames: the raw inputs out to an I/O batcher, the model's request back."""

from __future__ import annotations

import numpy as np

from broker import lifecycle as lc
from broker.batching import Task
from broker.inflight import Pending
from broker.lookup_codec import build_lookup_batch, model_request
from broker.models import ServedVersion
from broker.signatures import describe_for_clients
from tfbroker.client import encode_predict
from tfbroker.wire import protocol, tensors


def text_version() -> ServedVersion:
    """A model taking word ids and a count; clients send words (looked up by the I/O batcher)."""
    served = ServedVersion("text", 1, "/text/1", lc.Lifecycle("version 1", needs_tables=True))
    served.model_signatures = {"serving_default": protocol.SignatureSpec(
        inputs={"ids": ("int64", [-1, 3]), "n": ("float32", [-1])}, outputs={"y": ("float32", [-1])})}
    served.lookups = [protocol.LookupSpec("words", "string", "ids", "int64", 0)]
    describe_for_clients(served)
    return served


def pending(request_id: int, words: list[list[str]], n: list[float]) -> Task:
    frames = encode_predict(request_id, "text", {"words": np.array(words, dtype=object),
                                                 "n": np.array(n, np.float32)},
                            version=None, label=None, signature_name="serving_default", timeout_s=2.0)
    header = protocol.decode(frames, protocol.CLIENT_TO_BROKER).header
    return Task(len(n), 10.0, Pending(b"client", request_id, frames[2:], None, 0.0, header))


def test_clients_see_the_raw_input_in_place_of_the_looked_up_tensor() -> None:
    served = text_version()
    assert served.signatures["serving_default"].inputs == {"n": ("float32", [-1]), "words": ("string", [-1, 3])}


def test_a_lookup_batch_carries_only_the_inputs_lookups_take_and_the_model_gets_the_rest_back() -> None:
    served = text_version()
    tasks = [pending(1, [["a", "b", "c"]], [1.0]), pending(2, [["d", "e", "f"], ["g", "h", "i"]], [2.0, 3.0])]
    header, frames = build_lookup_batch(9, served, tasks, now=9.5)
    assert (header.batch, header.model, header.version, header.counts) == (9, "text", 1, [1, 1])
    assert [(s.name, s.dtype, s.shape) for s in header.inputs] == [("words", "string", (1, 3)),
                                                                   ("words", "string", (2, 3))]
    assert header.timeouts_ms == [500, 500]
    assert tensors.decode_tensors(header.inputs[1:], frames[1:])["words"].tolist() == [
        [b"d", b"e", b"f"], [b"g", b"h", b"i"]]

    ids = np.arange(6, dtype=np.int64).reshape(2, 3)
    specs, looked_up = tensors.encode_tensors({"ids": ids})
    request, model_frames = model_request(served, tasks[1].payload, specs, looked_up)
    assert [(s.name, s.dtype, s.shape) for s in request.inputs] == [("n", "float32", (2,)), ("ids", "int64", (2, 3))]
    assert protocol.decode_header(protocol.REQUEST, model_frames[0]) == request
    decoded = tensors.decode_tensors(request.inputs, model_frames[1:])
    assert decoded["n"].tolist() == [2.0, 3.0] and decoded["ids"].tolist() == ids.tolist()
