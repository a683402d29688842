"""The I/O batcher with real processes: lookups in their own batched stage, on the request's
pinned version, checked against TensorFlow doing the same lookups inside the graph.

``text/N`` takes looked-up tensors and ships its tables (lookups.json); ``text_ref/N`` is the
same model with tf.lookup and tf.nn.embedding_lookup inside the graph (tests/model_factory.py).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import httpx
import numpy as np
import pytest

from tfbroker import Client
from tests.conftest import debian_binary, free_port, pid_alive, reference_outputs, serving, wait_for
from tests.system.test_versions import version_states

WORDS_PER_INSTANCE = 4


@dataclass
class Vocab:
    words: list[str]
    users: list[str]


def vocab_of(version_dir: Path) -> Vocab:
    extra = version_dir / "assets.extra"
    return Vocab((extra / "vocab.txt").read_text().splitlines(), (extra / "users.txt").read_text().splitlines())


def random_instances(rng: np.random.Generator, vocab: Vocab, rows: int) -> list[dict[str, Any]]:
    """Known and unknown words and users, about one in four unknown."""
    def pick(known: list[str], unknown_prefix: str) -> str:
        return str(rng.choice(known)) if rng.random() > 0.25 else f"{unknown_prefix}{rng.integers(1 << 30)}"

    return [{"words": [pick(vocab.words, "oov") for _ in range(WORDS_PER_INSTANCE)], "user": pick(vocab.users, "nobody")}
            for _ in range(rows)]


def reference(model_dir: Path, requests: list[list[dict[str, Any]]]) -> list[dict[str, np.ndarray]]:
    batches = [{"words": np.array([i["words"] for i in instances]), "user": np.array([i["user"] for i in instances])}
               for instances in requests]
    return reference_outputs(model_dir, batches)


def check_equal(answer: list[dict[str, Any]], expected: dict[str, np.ndarray]) -> None:
    np.testing.assert_allclose([p["score"] for p in answer], expected["score"], rtol=1e-5, atol=1e-6)
    assert [p["oov"] for p in answer] == expected["oov"].tolist()


def test_answers_equal_tensorflow_doing_the_lookups_in_the_graph(test_models: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    vocab = vocab_of(test_models / "text" / "2")  # the latest version serves
    requests = [random_instances(rng, vocab, int(rng.integers(1, 4))) for _ in range(240)]
    expected = reference(test_models / "text_ref" / "2", requests)
    with serving(tmp_path, {"text": test_models / "text"}, ["--iobatchers=2"]) as broker:
        assert len(broker.pids_with("tfbroker: iobatcher")) == 2
        metadata = broker.http.get("/v1/models/text/metadata").json()
        inputs = metadata["metadata"]["signature_def"]["signature_def"]["serving_default"]["inputs"]
        assert {name: spec["dtype"] for name, spec in inputs.items()} == {"words": "DT_STRING", "user": "DT_STRING"}
        assert [d["size"] for d in inputs["words"]["tensor_shape"]["dim"]] == ["-1", "-1"]

        with Client(broker.address) as client:
            before = client.stats()

            def call(instances: list[dict[str, Any]]) -> httpx.Response:
                return broker.http.post("/v1/models/text:predict", json={"instances": instances})

            with ThreadPoolExecutor(16) as pool:  # concurrent: requests share lookup batches
                answers = list(pool.map(call, requests))
            after = client.stats()
            # The Python client sends the raw inputs too.
            first = requests[0]
            direct = client.predict("text", {"words": np.array([i["words"] for i in first]),
                                             "user": np.array([i["user"] for i in first])})
    failed = [(a.status_code, a.text) for a in answers if a.status_code != 200]
    assert not failed, failed[:3]
    for answer, want in zip(answers, expected):
        check_equal(answer.json()["predictions"], want)
    np.testing.assert_allclose(direct.outputs["score"], expected[0]["score"], rtol=1e-5)
    tasks = after["lookup_tasks"] - before["lookup_tasks"]
    batches = after["lookup_batches"] - before["lookup_batches"]
    keys = after["lookup_keys"] - before["lookup_keys"]
    unique = after["lookup_unique_keys"] - before["lookup_unique_keys"]
    assert tasks == len(requests)
    assert batches < tasks, f"{tasks} requests in {batches} lookup batches: none shared a batch"
    assert unique < keys, f"{keys} keys looked up, {unique} distinct: no key was deduplicated"


def test_a_swap_under_load_answers_every_request_with_one_versions_tables_and_model(
        start_broker: Any, test_models: Path, tmp_path: Path) -> None:
    base = tmp_path / "text"
    shutil.copytree(test_models / "text" / "1", base / "1")
    vocabs = {n: vocab_of(test_models / "text" / str(n)) for n in (1, 2)}
    both = Vocab(vocabs[1].words + vocabs[2].words, vocabs[1].users + vocabs[2].users)
    rng = np.random.default_rng(11)
    requests = [random_instances(rng, both, 2) for _ in range(60)]
    expected = {n: reference(test_models / "text_ref" / str(n), requests) for n in (1, 2)}
    broker = start_broker(["--model_name=text", f"--model_base_path={base}", "--file_system_poll_wait_seconds=0.2"])
    broker.wait_available(["text"])
    answers: list[tuple[int, httpx.Response]] = []
    stop = threading.Event()

    def load(offset: int) -> None:
        with httpx.Client(base_url=broker.base_url, timeout=30) as http:
            i = offset
            while not stop.is_set():
                index = i % len(requests)
                answers.append((index, http.post("/v1/models/text:predict", json={"instances": requests[index]})))
                i += 1

    threads = [threading.Thread(target=load, args=(k * 7,), daemon=True) for k in range(4)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.5)
        shutil.copytree(test_models / "text" / "2", base / "2")
        wait_for(lambda: version_states(broker, "text") == {1: "END", 2: "AVAILABLE"}, 120, "the swap to version 2")
        time.sleep(0.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    failed = [(r.status_code, r.text) for _, r in answers if r.status_code != 200]
    assert not failed, f"{len(failed)} of {len(answers)} failed: {failed[:3]}"
    seen = set()
    for index, response in answers:
        version = int(response.headers["x-model-version"])
        seen.add(version)
        check_equal(response.json()["predictions"], expected[version][index])
    assert seen == {1, 2}
    # Version 1's tables went with it: only version 2's are left in the I/O batcher.
    wait_for(lambda: "unloaded the tables of model text version 1" in broker.log(), 30, "version 1's tables to unload")


def test_a_corrupt_or_missing_table_fails_the_load_and_the_old_version_keeps_serving(
        start_broker: Any, test_models: Path, tmp_path: Path) -> None:
    base = tmp_path / "text"
    shutil.copytree(test_models / "text" / "1", base / "1")
    broker = start_broker(["--model_name=text", f"--model_base_path={base}", "--file_system_poll_wait_seconds=0.2"])
    broker.wait_available(["text"])
    body = {"instances": [{"words": ["a", "b"], "user": "u0"}]}
    for number, damage in ((2, "truncate"), (3, "remove")):
        staging = tmp_path / f"staging{number}"
        shutil.copytree(test_models / "text" / "1", staging)
        table = staging / "assets.extra" / "users.npy"
        if damage == "truncate":
            table.write_bytes(table.read_bytes()[:200])
        else:
            table.unlink()
        os.replace(staging, base / str(number))
        wait_for(lambda n=number: version_states(broker, "text").get(n) == "END", 120, f"version {number} to fail")
        status = broker.http.get(f"/v1/models/text/versions/{number}").json()["model_version_status"][0]
        assert "users.npy" in status["status"]["error_message"], status
        assert broker.predict("text", body).headers["x-model-version"] == "1"
        shutil.rmtree(base / str(number))
    assert version_states(broker, "text")[1] == "AVAILABLE"
    assert len(broker.pids_with("tfbroker: worker:text:")) == 1  # the failed versions' workers are gone


def test_a_killed_iobatcher_gives_503s_not_hangs_and_comes_back(test_models: Path, tmp_path: Path) -> None:
    body = {"instances": [{"words": ["a", "b"], "user": "u0"}]}
    with serving(tmp_path, {"text": test_models / "text"}) as broker:
        assert broker.predict("text", body).status_code == 200
        (pid,) = broker.pids_with("tfbroker: iobatcher")
        os.kill(pid, signal.SIGKILL)
        codes = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # until the restarted I/O batcher answers
            sent = time.monotonic()
            response = broker.predict("text", body)
            assert time.monotonic() - sent < 5, "a request hung while the I/O batcher was down"
            assert response.status_code in (200, 503), response.text
            if response.status_code == 503:  # says why
                assert "I/O batcher" in response.json()["error"], response.text
            codes.append(response.status_code)
            restarted = [p for p in broker.pids_with("tfbroker: iobatcher") if p != pid]
            if restarted and response.status_code == 200:
                break
        assert codes[-1] == 200, codes[-10:]
        assert not pid_alive(pid)


@pytest.fixture()
def redis_server(tmp_path: Path) -> Iterator[tuple[int, Any]]:
    """A real redis-server on a free loopback port (installed from Debian's packages if missing)."""
    import redis

    binary = debian_binary("redis-server", "redis-server")
    port = free_port()
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(tmp_path)]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    wait_for(lambda: ping(client), 10, "redis-server to start")
    holder = {"process": process}

    def restart() -> None:
        holder["process"] = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: ping(client), 10, "redis-server to restart")

    client.restart = restart  # type: ignore[attr-defined]
    client.server = holder  # type: ignore[attr-defined]
    yield port, client
    holder["process"].kill()
    holder["process"].wait(10)


def ping(client: Any) -> bool:
    try:
        return bool(client.ping())
    except Exception:  # noqa: BLE001 - not up yet
        return False


def test_every_kind_of_table_with_a_real_redis_then_redis_down_and_back(
        redis_server: tuple[int, Any], test_models: Path, tmp_path: Path) -> None:
    port, store = redis_server
    base = tmp_path / "kinds"
    shutil.copytree(test_models / "kinds" / "1", base / "1")
    declared = base / "1" / "assets.extra" / "lookups.json"
    declared.write_text(declared.read_text().replace("REDIS_PORT", str(port)))
    shops = {f"s{i}": np.arange(4, dtype="<f4") + 10 * i for i in range(5)}
    for name, vector in shops.items():
        store.set(f"shop:{name}", vector.tobytes())
    with serving(tmp_path, {"kinds": base}, ["--lookup_redis_timeout_ms=300"]) as broker:
        body = {"instances": [{"tag": "sport", "item": 3, "shop": "s2"}, {"tag": "cooking", "item": 9, "shop": "s9"}]}
        response = broker.predict("kinds", body)
        assert response.status_code == 200, response.text
        first, second = response.json()["predictions"]
        assert first == {"tag_out": 1, "item_out": [9.0, 10.0, 11.0], "shop_out": [20.0, 21.0, 22.0, 23.0]}
        # An unknown tag gets the default value; an unknown Redis key a row of zeros.
        assert second == {"tag_out": -7, "item_out": [27.0, 28.0, 29.0], "shop_out": [0.0, 0.0, 0.0, 0.0]}
        # on_missing "error": a row id beyond the table is a 400 naming the key, for that request alone.
        with ThreadPoolExecutor(8) as pool:
            bodies = [{"instances": [{"tag": "news", "item": 12 if i % 4 == 0 else i % 10, "shop": "s1"}]}
                      for i in range(40)]
            results = list(pool.map(lambda b: broker.predict("kinds", b), bodies))
        for sent, result in zip(bodies, results):
            if sent["instances"][0]["item"] == 12:
                assert result.status_code == 400 and "12" in result.json()["error"], result.text
            else:
                assert result.status_code == 200, result.text
                assert result.json()["predictions"][0]["item_out"][0] == 3 * sent["instances"][0]["item"]

        # Redis down: fast 503s; back: answers again.
        store.server["process"].kill()
        store.server["process"].wait(10)
        started = time.monotonic()
        down = broker.predict("kinds", body)
        assert down.status_code == 503 and "unavailable" in down.json()["error"], down.text
        assert time.monotonic() - started < 3
        store.restart()
        for name, vector in shops.items():
            store.set(f"shop:{name}", vector.tobytes())
        wait_for(lambda: broker.predict("kinds", body).status_code == 200, 20, "lookups to work again")
        assert broker.predict("kinds", body).json()["predictions"][0] == first
