"""Property-based fuzzing of every socket a peer can reach: the broker's frontend and backend
sockets, a model worker's socket, and HTTP. No process dies, every client gets an answer (or
the deadline it asked for), and correct requests sent afterwards get correct answers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tfbroker.wire import protocol, tensors
from broker.supervisor import terminate
from tfbroker import Client
from tests.conftest import ROOT, BrokerProcess, pid_alive, serving, wait_for

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))

KEYS = ["id", "model", "inputs", "kind", "batch", "counts", "rows", "ids", "timeouts_ms", "timeout_ms",
        "signature", "outputs", "version", "label", "padded_rows", "op", "args"]
scalars = (st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1) | st.floats()
           | st.sampled_from(["linear", "x", "float32", "string", "serving_default", "t", "j", ""])
           | st.binary(max_size=8))
values = st.recursive(scalars, lambda children: st.lists(children, max_size=4)
                      | st.dictionaries(st.sampled_from(KEYS), children, max_size=7), max_leaves=24)
spec = st.tuples(st.sampled_from(["x", "", "y"]), st.sampled_from(["float32", "int64", "string", "bool"]),
                 st.lists(st.integers(0, 3), max_size=3)).map(list)
requests = st.fixed_dictionaries({"id": st.integers(0, 1 << 20), "model": st.sampled_from(["linear", "nope"]),
                                  "timeout_ms": st.integers(1, 3000), "inputs": st.lists(spec, max_size=2)},
                                 optional={"version": st.integers(0, 3), "signature": st.sampled_from(["serving_default", "x"])})
headers = values | requests
frame_lists = st.lists(st.binary(max_size=24), max_size=3)


@pytest.fixture(scope="module")
def fuzzed(test_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    with serving(tmp_path_factory.mktemp("fuzzed"), {"linear": test_models / "linear"}) as broker:
        yield broker


def dealer(address: str, identity: bytes | None = None, *, reconnect: bool = True) -> tuple[zmq.Context, zmq.Socket]:
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if not reconnect:
        sock.setsockopt(zmq.RECONNECT_IVL, -1)
    if identity:
        sock.setsockopt(zmq.IDENTITY, identity)
    sock.connect(address)
    return context, sock


def still_serves(broker: BrokerProcess) -> None:
    assert broker.process.poll() is None
    assert broker.predict("linear", {"instances": [2.0]}).json() == {"predictions": [4.0]}
    with Client(broker.address) as client:
        assert client.predict("linear", {"x": np.array([2.0], np.float32)}).outputs["y"].tolist() == [4.0]


def test_the_frontend_socket_answers_whatever_arrives(fuzzed: BrokerProcess) -> None:
    context, sock = dealer(fuzzed.address)
    commands = st.sampled_from(sorted(protocol.HEADER_TYPES)) | st.binary(max_size=2)

    @FUZZ
    @given(st.sampled_from([protocol.TAG, b"TFB01", b""]), commands, headers, frame_lists)
    def check(tag: bytes, command: bytes, header: Any, frames: list[bytes]) -> None:
        sock.send_multipart([tag, command, msgpack.packb(header), *frames])
        if command == protocol.CANCEL and tag == protocol.TAG:
            return  # a cancel is answered only when it takes a queued request out
        assert sock.poll(10_000), f"no answer to {[tag, command, header, frames]!r}"
        answer = protocol.decode(sock.recv_multipart(), protocol.BROKER_TO_CLIENT)
        assert answer.command in (protocol.REPLY, protocol.ERROR, protocol.HEARTBEAT)

    try:
        check()
        while sock.poll(500):  # late answers of requests that were queued
            protocol.decode(sock.recv_multipart(), protocol.BROKER_TO_CLIENT)
    finally:
        context.destroy(linger=0)
    still_serves(fuzzed)


def test_the_backend_socket_survives_strangers(fuzzed: BrokerProcess) -> None:
    backend = f"ipc://{fuzzed.runtime_dir}/backend.sock"

    @FUZZ
    @given(st.binary(min_size=1, max_size=12), st.sampled_from(sorted(protocol.HEADER_TYPES)), headers, frame_lists)
    def check(identity: bytes, command: bytes, header: Any, frames: list[bytes]) -> None:
        context, sock = dealer(backend, identity)
        try:
            sock.send_multipart([protocol.TAG, command, msgpack.packb(header), *frames])
            assert sock.poll(10_000), "the broker tells an unknown worker to go"
            assert protocol.decode(sock.recv_multipart(), protocol.BROKER_TO_WORKER).command == protocol.DISCONNECT
        finally:
            context.destroy(linger=0)

    check()
    still_serves(fuzzed)


def test_a_stranger_with_an_identity_still_connected_is_answered_too(fuzzed: BrokerProcess) -> None:
    """What made the test above flaky under load: a second peer with the identity of one whose
    connection the broker still holds (there, the previous example's, not yet seen closed) was
    never heard. Deterministic here: the first one stays connected, and never reconnects once
    the broker hands its identity over (as a dead worker's connection would not)."""
    backend = f"ipc://{fuzzed.runtime_dir}/backend.sock"
    peers = []
    try:
        # One after the other: the first is known to the broker (it was answered) and still
        # connected when the second comes.
        for name, reconnect in (("first", False), ("second", True)):
            context, sock = dealer(backend, b"j", reconnect=reconnect)
            peers.append((context, sock))
            sock.send_multipart(protocol.encode(protocol.HEARTBEAT, protocol.Heartbeat()))
            assert sock.poll(10_000), f"the broker tells the {name} unknown worker to go"
            assert protocol.decode(sock.recv_multipart(), protocol.BROKER_TO_WORKER).command == protocol.DISCONNECT
    finally:
        for context, sock in peers:
            sock.close(linger=0)
            context.destroy(linger=0)


def test_http_answers_arbitrary_bytes_and_json_with_json(fuzzed: BrokerProcess) -> None:
    http = fuzzed.http
    json_values = st.recursive(st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats(allow_nan=False)
                               | st.text(max_size=6),
                               lambda children: st.lists(children, max_size=4)
                               | st.dictionaries(st.sampled_from(["instances", "inputs", "signature_name", "x", "b64"])
                                                 | st.text(max_size=4), children, max_size=4), max_leaves=20)

    @FUZZ
    @given(st.binary(max_size=64) | json_values.map(lambda v: json.dumps(v).encode()),
           st.sampled_from(["/v1/models/linear:predict", "/v1/models/linear/versions/2:predict",
                            "/v1/models/linear/labels/x:predict", "/v1/models/nope:predict"]))
    def check(body: bytes, path: str) -> None:
        response = http.post(path, content=body, headers={"content-type": "application/json"})
        assert response.headers["content-type"] == "application/json", response.text
        assert response.status_code < 500, (body, response.status_code, response.text)
        assert response.status_code == 200 or "error" in response.json()

    check()
    still_serves(fuzzed)


@pytest.fixture()
def lone_worker(test_models: Path) -> Iterator[tuple[zmq.Socket, subprocess.Popen[bytes], bytes]]:
    """A real model worker connected to a ROUTER this test holds: the test is its broker."""
    runtime = Path(tempfile.mkdtemp(prefix="tfb-"))
    address = f"ipc://{runtime}/backend.sock"
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(address)
    env = {k: v for k, v in os.environ.items() if k != "TFBROKER_PARENT_PID"}
    worker = subprocess.Popen([sys.executable, "-m", "workers", "--model_name=linear", "--version=2",
                               f"--path={test_models / 'linear' / '2'}", f"--backend_address={address}",
                               "--heartbeat_interval_s=60"], cwd=ROOT, env=env)
    try:
        assert router.poll(120_000), "the worker says READY"
        identity, *frames = router.recv_multipart()
        assert protocol.decode(frames, protocol.WORKER_TO_BROKER).command == protocol.READY
        yield router, worker, identity
    finally:
        terminate(worker, grace_s=10)
        context.destroy(linger=0)


def test_a_worker_survives_whatever_a_broker_sends(lone_worker: tuple[zmq.Socket, subprocess.Popen[bytes], bytes]
                                                   ) -> None:
    router, worker, identity = lone_worker
    request = protocol.encode_header(protocol.Request(id=5, model="linear", timeout_ms=1000,
                                                      inputs=[protocol.TensorSpec("x", "float32", (2,))]))
    batch_headers = values | st.fixed_dictionaries({
        "kind": st.sampled_from(["t", "j"]), "batch": st.integers(0, 100), "signature": st.sampled_from(
            ["serving_default", "nope"]), "counts": st.lists(st.integers(0, 3), max_size=3),
        "ids": st.lists(st.integers(0, 9), max_size=3), "rows": st.lists(st.integers(0, 3), max_size=3),
        "timeouts_ms": st.lists(st.integers(0, 1000), max_size=3), "inputs": st.lists(spec, max_size=2)})
    payload = st.lists(st.binary(max_size=12) | st.just(request) | st.just(np.ones(2, np.float32).tobytes()),
                       max_size=4)

    @FUZZ
    @given(st.sampled_from([protocol.BATCH, protocol.HEARTBEAT, protocol.DISCONNECT + b"x", protocol.RESULT]),
           batch_headers, payload)
    def check(command: bytes, header: Any, frames: list[bytes]) -> None:
        router.send_multipart([identity, protocol.TAG, command, msgpack.packb(header), *frames])
        while router.poll(20):  # whatever it answers must decode
            _, *answer = router.recv_multipart()
            protocol.decode(answer, protocol.WORKER_TO_BROKER)
        assert worker.poll() is None, "the worker is still running"

    check()
    good = protocol.TaskBatch(batch=999, signature="serving_default", counts=[2], timeouts_ms=[5000])
    router.send_multipart([identity, *protocol.encode(protocol.BATCH, good,
                                                      [request, np.array([2.0, 4.0], np.float32).tobytes()])])
    deadline = time.monotonic() + 30
    while True:
        assert router.poll(max(1, int((deadline - time.monotonic()) * 1000))), "an answer to a correct batch"
        _, *answer = router.recv_multipart()
        message = protocol.decode(answer, protocol.WORKER_TO_BROKER)
        if message.command == protocol.RESULT and message.header.batch == 999:
            break
    reply = protocol.decode([protocol.TAG, *message.frames], protocol.BROKER_TO_CLIENT)
    assert reply.command == protocol.REPLY, reply
    assert tensors.decode_tensors(reply.header.outputs, reply.frames)["y"].tolist() == [4.0, 5.0]
    assert pid_alive(worker.pid)
    wait_for(lambda: worker.poll() is None, 1, "the worker to be alive")
