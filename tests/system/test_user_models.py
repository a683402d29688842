"""Models of the kinds users bring (tests/user_models.py), held to every promise: whatever a
client or an attacker sends, over REST, gRPC or the Python client, the answer is 200 with the
values TensorFlow computes in-process, or a 4xx that names the input; no worker ever dies.
And a model whose kernel aborts on one value loses one request to it, not its availability."""

from __future__ import annotations

import json
import math
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import grpc
import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from frontend import grpc_messages as pb
from frontend.grpc_tensors import from_proto, to_proto
from tfbroker import Client
from tfbroker.wire.errors import TFBrokerError
from tests.conftest import BrokerProcess, reference_outputs, serving, wait_for
from tests.user_models import POISON

# Each model's inputs: dtype and the dimensions after the batch dimension.
SIGNATURES: dict[str, dict[str, tuple[str, tuple[int, ...]]]] = {
    "conv": {"image": ("float32", (32, 32, 3))},
    "embed": {"ids": ("int64", (5,))},
    "lstm": {"steps": ("float32", (6, 3))},
    "mixed": {"ids": ("int32", (3,)), "weights": ("float64", ())},
    "words": {"text": ("string", ())},
}
BATTERY_MODELS = list(SIGNATURES)
PREDICT = "/tensorflow.serving.PredictionService/Predict"


@pytest.fixture(scope="module")
def broker(user_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    """The battery's models and a TensorFlow Lite one (``lite``: with --prefer_tflite_model its
    model.tflite serves, not the SavedModel beside it), logging JSON."""
    models = {name: user_models / name for name in [*BATTERY_MODELS, "lite"]}
    with serving(tmp_path_factory.mktemp("battery"), models, args=["--log_format=json", "--prefer_tflite_model"]) as running:
        yield running


def worker_pids(broker: BrokerProcess) -> dict[str, list[int]]:
    return {name: broker.pids_with(f"tfbroker: worker:{name}:") for name in BATTERY_MODELS}


def grpc_predict(port: int, model: str, arrays: dict[str, np.ndarray]) -> tuple[int, str, dict[str, np.ndarray]]:
    """(HTTP-like status, error message, outputs) of one Predict over gRPC, from our own protos."""
    request = pb.PredictRequest()
    request.model_spec.name = model
    for name, array in arrays.items():
        if array.dtype == object:
            array = np.vectorize(lambda v: str(v).encode(), otypes=[object])(array) if array.size else array
        request.inputs[name].CopyFrom(to_proto(array, as_content=array.dtype != object))
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(PREDICT, request_serializer=pb.PredictRequest.SerializeToString,
                                   response_deserializer=pb.PredictResponse.FromString)
        try:
            response = call(request, timeout=60)
        except grpc.RpcError as exc:
            status = {grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.NOT_FOUND: 404,
                      grpc.StatusCode.RESOURCE_EXHAUSTED: 413}.get(exc.code(), 500)
            return status, f"{exc.code().name}: {exc.details()}", {}
    return 200, "", {name: np.asarray(from_proto(name, proto)) for name, proto in response.outputs.items()}


def rest_predict(broker: BrokerProcess, model: str, arrays: dict[str, np.ndarray],
                 rows_format: bool, ragged: bool = False) -> tuple[int, str, dict[str, np.ndarray]]:
    """One predict over REST, in TF Serving's row (``instances``) or column (``inputs``) format;
    ``ragged``: the first input's first row nested one level deeper than the others."""
    def plain(array: np.ndarray) -> Any:
        return array.astype(str).tolist() if array.dtype == object else array.tolist()

    columns = {name: plain(array) for name, array in arrays.items()}
    if ragged:
        first = next(iter(columns.values()))
        first[0] = [first[0]]
    if rows_format:
        rows = len(next(iter(columns.values())))
        body: dict[str, Any] = {"instances": [
            next(iter(columns.values()))[i] if len(columns) == 1 else {name: col[i] for name, col in columns.items()}
            for i in range(rows)]}
    else:
        body = {"inputs": next(iter(columns.values())) if len(columns) == 1 else columns}
    response = broker.http.post(f"/v1/models/{model}:predict", content=json.dumps(body).encode(), timeout=60)
    if response.status_code != 200:
        return response.status_code, response.json().get("error", response.text), {}
    answer = response.json()
    outputs = answer["predictions"] if rows_format else answer["outputs"]
    if isinstance(outputs, dict):  # several outputs, columns
        return 200, "", {name: np.asarray(value) for name, value in outputs.items()}
    if outputs and isinstance(outputs[0], dict):  # several outputs, rows
        return 200, "", {name: np.asarray([row[name] for row in outputs]) for name in outputs[0]}
    return 200, "", {"": np.asarray(outputs)}


@dataclass
class Call:
    model: str
    arrays: dict[str, np.ndarray]
    expect: str  # "ok": 200 with TensorFlow's values; "bad": a 4xx naming an input; "either"
    transport: str
    why: str = ""
    names: list[str] = field(default_factory=list)
    ragged: bool = False  # REST: one row nested deeper than the rest


@st.composite
def calls(draw: Any) -> Call:
    """A request as clients and attackers send them, and what it must get."""
    model = draw(st.sampled_from(BATTERY_MODELS))
    signature = SIGNATURES[model]
    rows = draw(st.sampled_from([0, 1, 2, 3, 7, 3000 if model != "conv" else 40]))
    mutation = draw(st.sampled_from(["none", "none", "none", "rank+1", "rank-1", "dim", "dtype", "rows", "missing",
                                     "extra"]))
    values = draw(st.sampled_from(["normal", "normal", "nan", "inf", "range"]))
    target = draw(st.sampled_from(sorted(signature)))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    arrays: dict[str, np.ndarray] = {}
    expect, why = "ok", ""
    for name, (dtype, inner) in signature.items():
        shape = [rows, *inner]
        if name == target and mutation == "rank+1":
            shape.append(2)
            expect, why = "bad", "rank"
        elif name == target and mutation == "rank-1":
            shape = shape[:-1] if inner else []
            expect, why = "bad", "rank"
        elif name == target and mutation == "dim" and inner:
            shape[1] += 1
            expect, why = "bad", "dimension"
        elif name == target and mutation == "rows" and len(signature) > 1:
            shape[0] += 1
            expect, why = "bad", "rows differ"
        if dtype == "string":
            array = np.array([f"w{i}" for i in range(math.prod(shape))], dtype=object).reshape(shape)
        elif dtype.startswith("int"):
            high = 100 if values != "range" else 1000
            array = rng.integers(-high if values == "range" else 0, high, shape).astype(dtype)
            if values == "range" and model == "embed" and array.size:
                expect, why = ("either" if expect == "ok" else expect), "ids out of range"
        else:
            array = rng.standard_normal(shape).astype(dtype)
            if values in ("nan", "inf") and array.size:
                array.reshape(-1)[0] = np.nan if values == "nan" else -np.inf
        if name == target and mutation == "dtype":
            array = (array.astype(str).astype(object) if dtype != "string"
                     else np.arange(array.size, dtype=np.float64).reshape(array.shape))
            expect, why = "bad", "dtype"
        arrays[name] = array
    if mutation == "missing" and len(signature) > 1:  # (an empty request names no input to miss)
        del arrays[target]
        expect, why = "bad", "missing input"
    if mutation == "extra":
        arrays["bogus"] = np.zeros([rows], np.float32)
        expect, why = "bad", "extra input"
    if rows == 0 and expect == "ok":
        expect, why = "either", "no rows"
    row_shaped = len({a.shape[:1] for a in arrays.values() if a.ndim}) == 1 and all(a.ndim for a in arrays.values())
    transports = ["rest_inputs", "grpc", "client"] + (["rest_instances"] if row_shaped and rows else [])
    transport = draw(st.sampled_from(transports))
    ragged = transport.startswith("rest") and rows >= 2 and draw(st.booleans()) and draw(st.booleans())
    names = [*signature, "bogus"]
    if why == "missing input" and len(arrays) == 1 and transport.startswith("rest"):
        # The one input left goes unnamed (a plain list): TF Serving's words for that name none.
        names.append("but expecting list of objects as multiple input tensors" if transport == "rest_instances"
                     else "but expecting an object as multiple input tensors")
    if ragged:
        expect, why = "bad", "ragged nesting"
        if len(signature) == 1:  # a lone input goes unnamed (a list as 'inputs' or 'instances'): its field is named
            names.append("'inputs'" if transport == "rest_inputs" else "'instances'")
    return Call(model, arrays, expect, transport, why, names, ragged)


def send(broker: BrokerProcess, client: Client, call: Call) -> tuple[int, str, dict[str, np.ndarray]]:
    if call.transport == "grpc":
        return grpc_predict(broker.grpc_port, call.model, call.arrays)
    if call.transport == "client":
        try:
            prediction = client.predict(call.model, call.arrays, timeout_s=60)
        except TFBrokerError as exc:
            return exc.http_status, exc.message, {}
        return 200, "", prediction.outputs
    return rest_predict(broker, call.model, call.arrays, rows_format=call.transport == "rest_instances",
                        ragged=call.ragged)


def test_no_input_crashes_a_worker_and_each_answer_is_tensorflows_or_names_the_input(broker: BrokerProcess,
                                                                                   user_models: Path) -> None:
    pids = worker_pids(broker)
    assert all(len(found) == 1 for found in pids.values()), pids
    answered: dict[str, list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]] = {m: [] for m in BATTERY_MODELS}
    outcomes: dict[str, int] = {}
    client = Client(broker.address)

    # 250 requests (BATTERY_EXAMPLES), the same ones every run (derandomize): a failure reproduces.
    @settings(max_examples=int(os.environ.get("BATTERY_EXAMPLES", "250")), deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(calls())
    def battery(call: Call) -> None:
        status, message, outputs = send(broker, client, call)
        outcomes[f"{call.expect}->{status}"] = outcomes.get(f"{call.expect}->{status}", 0) + 1
        context = (call.model, call.transport, call.why, {n: (a.dtype, a.shape) for n, a in call.arrays.items()},
                   status, message[:300])
        assert status == 200 or 400 <= status < 500, context
        if call.expect == "ok":
            assert status == 200, context
        elif call.expect == "bad":
            assert 400 <= status < 500, context
            assert any(name in message for name in call.names), context
        if status == 200 and len(answered[call.model]) < 12:
            answered[call.model].append((call.arrays, outputs))

    try:
        battery()
    finally:
        client.close()
    print("battery outcomes:", dict(sorted(outcomes.items())))

    # No worker restarted, and the broker saw no worker die.
    assert worker_pids(broker) == pids
    assert "exited with code" not in broker.log() and "restarting" not in broker.log(), broker.log()[-3000:]

    # Every 200 carried what TensorFlow computes in-process.
    for model, pairs in answered.items():
        if not pairs:
            continue
        expected = reference_outputs(user_models / model / "1", [inputs_as_signature(model, i) for i, _ in pairs])
        for (_, got), want in zip(pairs, expected):
            assert_outputs_equal(model, got, want)


def inputs_as_signature(model: str, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    converted = {}
    for name, array in arrays.items():
        dtype = SIGNATURES[model][name][0]
        converted[name] = array.astype("S") if dtype == "string" else array.astype(dtype)
    return converted


def assert_outputs_equal(model: str, got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    if list(got) == [""]:  # REST's unnamed single output
        got = {next(iter(want)): got[""]}
    assert sorted(got) == sorted(want), (model, sorted(got), sorted(want))
    for name, expected in want.items():
        actual = got[name]
        if expected.dtype.kind == "S":
            actual_bytes = [v if isinstance(v, bytes) else str(v).encode() for v in np.asarray(actual).reshape(-1)]
            assert actual_bytes == expected.reshape(-1).tolist(), (model, name)
        else:
            np.testing.assert_allclose(np.asarray(actual, dtype=np.float64).reshape(expected.shape), expected,
                                       rtol=1e-5, atol=1e-6, equal_nan=True, err_msg=f"{model} {name}")


def test_the_issues_own_crashes_are_400s_that_name_the_input(broker: BrokerProcess) -> None:
    """The wrong-rank image that aborted oneDNN's Conv2D, on every path, and gRPC's float64."""
    pids = worker_pids(broker)
    response = broker.predict("conv", {"instances": [[[1, 2, 3]]]})
    message = "input 'image': expected shape [-1,32,32,3] (float32), got [1,1,3]"
    assert (response.status_code, response.json()) == (400, {"error": message})
    assert grpc_predict(broker.grpc_port, "conv", {"image": np.ones([1, 1, 3], np.float32)})[:2] == (
        400, f"INVALID_ARGUMENT: {message}")
    with Client(broker.address) as client:
        with pytest.raises(TFBrokerError, match=re.escape(message)):
            client.predict("conv", {"image": np.ones([1, 1, 3], np.float32)})
    # gRPC takes each tensor's dtype as it is, as TF Serving does; JSON's numbers are cast.
    assert grpc_predict(broker.grpc_port, "lstm", {"steps": np.ones([1, 6, 3], np.float64)})[:2] == (
        400, "INVALID_ARGUMENT: input 'steps': values of type double are not of expected type: float")
    assert broker.predict("lstm", {"instances": [[[1] * 3] * 6]}).status_code == 200
    assert worker_pids(broker) == pids


def test_a_request_that_kills_its_worker_fails_alone_and_repeating_it_keeps_the_model_available(
        user_models: Path, tmp_path: Path) -> None:
    """poison/1 aborts its process on x == 666 inside a kernel: mixed into batches of good
    requests, only it fails; repeated once a second, it never takes the model down again."""
    repeat_s = 15.0 if os.environ.get("CI") else 30.0  # CI's 15 minutes are shared by the whole suite
    (tmp_path / "batching.config").write_text("max_batch_size { value: 8 }\nbatch_timeout_micros { value: 20000 }\n")
    with serving(tmp_path, {"poison": user_models / "poison"},
                 args=[f"--batching_parameters_file={tmp_path / 'batching.config'}"], frontends=2) as broker:
        first_worker = broker.pids_with("tfbroker: worker:poison:")
        stop = threading.Event()
        good: list[tuple[float, int, Any, float]] = []  # (value, status, answer, when answered)

        def steady(offset: int) -> None:
            with httpx.Client(base_url=broker.base_url, timeout=60) as http:
                value = offset + 0.25  # never the poison value (an integer)
                while not stop.is_set():
                    value += 1.0
                    response = http.post("/v1/models/poison:predict", json={"instances": [value]})
                    good.append((value, response.status_code, response.json(), time.monotonic()))

        threads = [threading.Thread(target=steady, args=(1000 * i,)) for i in range(6)]
        for thread in threads:
            thread.start()
        wait_for(lambda: len(good) >= 30, 30, "steady traffic")
        poisoned = []
        started = time.monotonic()
        while time.monotonic() - started < repeat_s:
            sent = time.monotonic()
            response = broker.http.post("/v1/models/poison:predict", json={"instances": [2.0, POISON, 3.0]})
            poisoned.append((response.status_code, response.json().get("error", ""), time.monotonic()))
            stop.wait(max(0.0, 1.0 - (time.monotonic() - sent)))  # the client's pace: once a second
        stop.set()
        for thread in threads:
            thread.join(timeout=60)

        assert poisoned[0][:2] == (400, "the model's process died on this request"), poisoned[:3]
        assert len(poisoned) >= 3 and all(
            status == 400 and error.startswith("the model's process died on this request earlier")
            for status, error, _ in poisoned[1:]), poisoned
        bad = [(value, status, body) for value, status, body, _ in good
               if status != 200 or body != {"predictions": [value * 2.0]}]
        assert not bad, f"{len(bad)} of {len(good)} good requests were not answered right: {bad[:5]}"
        # Once the poison is known, repeating it costs the others nothing: they keep flowing.
        found_at = poisoned[0][2]
        after = [when for *_, when in good if when > found_at]
        assert len(after) > 20 * (poisoned[-1][2] - found_at), (len(after), poisoned[-1][2] - found_at)
        status = broker.http.get("/v1/models/poison").json()["model_version_status"]
        assert [v["state"] for v in status] == ["AVAILABLE"]
        with Client(broker.address) as client:
            counters = client.stats()
        assert (counters["killed_worker"], counters["refused_poison"]) == (1, len(poisoned) - 1), counters
        # Its worker died twice (the batch, then the poison alone), each time back at once.
        assert broker.log().count("a request killed its worker") == 1, broker.log()[-3000:]
        # Its last words, relayed by the broker in the log format, with the worker's role.
        assert re.search(r" CRITICAL \[worker:poison:1 \d+\] tensorflow.cc: Check failed", broker.log()), \
            broker.log()[-3000:]
        assert broker.pids_with("tfbroker: worker:poison:") != first_worker


def test_what_tensorflow_says_while_serving_is_logged_in_the_log_format(broker: BrokerProcess) -> None:
    """Out-of-range ids make TensorFlow write its own lines while serving: they come as JSON
    records of the worker under --log_format=json, not as raw text."""
    response = broker.predict("embed", {"instances": [[1, 2, 3, 4, 500]]})
    assert response.status_code == 400, response.text
    assert response.json()["error"].startswith("indices[0,4] = 500 is not in [0, 100)"), response.text

    def tensorflows_record() -> dict[str, Any] | None:
        for line in broker.log().splitlines():
            if line.startswith("{"):
                record = json.loads(line)
                # (TensorFlow may say it once for many such requests: the battery sent some before)
                if record["logger"] == "tensorflow.cc" and record["role"] == "worker:embed:1" and "indices[" in record[
                        "message"]:
                    return record  # type: ignore[no-any-return]
        return None

    record = wait_for(tensorflows_record, 10, "TensorFlow's note on the bad ids, as a record of the worker")
    assert record["pid"] == broker.pids_with("tfbroker: worker:embed:")[0]
    odd = [line for line in broker.log().splitlines()
           if line.strip() and not line.startswith(("{", "tfbroker: ready", "  curl", "Status page"))]
    assert not odd, odd


def test_a_tflite_model_serves_on_every_path_batched_and_checked(broker: BrokerProcess) -> None:
    """--prefer_tflite_model: the version's model.tflite through TensorFlow Lite's interpreter,
    its signatures as the model's (metadata, REST, gRPC, the client)."""
    # y = 3·sum(x) + 1: the TensorFlow Lite model, not the SavedModel beside it (2·sum(x) + 1).
    answer = broker.predict("lite", {"instances": [{"x": [1.0, 2.0], "k": 1}, {"x": [0.5, 0.5], "k": 4}]})
    assert answer.json() == {"predictions": [{"k2": 2, "y": 10.0}, {"k2": 8, "y": 4.0}]}, answer.text
    metadata = broker.http.get("/v1/models/lite/metadata").json()["metadata"]["signature_def"]["signature_def"]
    inputs = metadata["serving_default"]["inputs"]
    assert {n: (t["dtype"], [d["size"] for d in t["tensor_shape"]["dim"]]) for n, t in inputs.items()} == {
        "x": ("DT_FLOAT", ["-1", "2"]), "k": ("DT_INT32", ["-1"])}
    status, _, outputs = grpc_predict(broker.grpc_port, "lite", {"x": np.ones([3, 2], np.float32),
                                                                  "k": np.arange(3, dtype=np.int32)})
    assert status == 200 and outputs["y"].tolist() == [7.0] * 3 and outputs["k2"].tolist() == [0, 2, 4]

    # Batched with each other, each request gets its own rows (the interpreter resized to each batch).
    def call(i: int) -> tuple[int, list[float]]:
        with Client(broker.address) as client:
            result = client.predict("lite", {"x": np.full([i % 3 + 1, 2], i, np.float32),
                                             "k": np.full([i % 3 + 1], i, np.int32)})
        return i, result.outputs["y"].tolist()

    with ThreadPoolExecutor(8) as pool:
        for i, y in pool.map(call, range(40)):
            assert y == [6.0 * i + 1.0] * (i % 3 + 1)

    # A wrong inner dimension, which the interpreter would not catch, is refused at admission.
    refused = broker.predict("lite", {"inputs": {"x": [[1.0, 2.0, 3.0]], "k": [1]}})
    assert refused.status_code == 400
    assert refused.json()["error"] == "input 'x': expected shape [-1,2] (float32), got [1,3]"
