"""One worker per device (issue 13, --devices): tested with two CPU replicas, the way a host
with two GPUs runs (each replica sees one device through CUDA_VISIBLE_DEVICES)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tfbroker.runtime.devices import resolve_devices
from tfbroker import Client
from tests.conftest import BrokerProcess, pid_alive, wait_for
from tests.system.test_versions import ctl, version_states


def replicas(broker: BrokerProcess, model: str) -> dict[int, list[dict[str, Any]]]:
    """Each version's replicas, from the broker's own status (`broker.ctl --json status`)."""
    out = ctl(broker, "--json", "status")
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    return {v["version"]: v["replicas"] for m in status["models"] if m["name"] == model for v in m["versions"]
            if v["state"] == "AVAILABLE"}


def worker_titles(broker: BrokerProcess) -> dict[str, list[int]]:
    return {title: pids for title, pids in broker.roles().items() if title.startswith("tfbroker: worker:")}


class Load:
    """Threads sending predictions back to back; every outcome kept (a dropped connection too)."""

    def __init__(self, broker: BrokerProcess, threads: int = 8) -> None:
        self.outcomes: list[tuple[int, str, float]] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(broker.base_url,)) for _ in range(threads)]

    def _run(self, url: str) -> None:
        with httpx.Client(base_url=url, timeout=30) as http:
            while not self._stop.is_set():
                try:
                    response = http.post("/v1/models/linear:predict", json={"instances": [1.0, 2.0]})
                    outcome = (response.status_code, response.headers.get("x-model-version", ""),
                               response.json()["predictions"][0] if response.status_code == 200 else response.text)
                except httpx.HTTPError as exc:
                    outcome = (0, "", f"{type(exc).__name__}: {exc}")
                with self._lock:
                    self.outcomes.append(outcome)

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)


def test_devices_flag() -> None:
    assert [d.name for d in resolve_devices("cpu,cpu")] == ["cpu0", "cpu1"]
    assert [d.cuda_visible_devices for d in resolve_devices("cpu,cpu")] == ["", ""]
    with pytest.raises(ValueError, match="not a device"):
        resolve_devices("tpu0")
    os.environ["CUDA_VISIBLE_DEVICES"] = "3,5"
    try:
        assert [(d.name, d.cuda_visible_devices) for d in resolve_devices("")] == [("gpu3", "3"), ("gpu5", "5")]
        assert [d.name for d in resolve_devices("gpu5,cpu")] == ["gpu5", "cpu"]
        with pytest.raises(ValueError, match="gpu1 is not visible"):
            resolve_devices("gpu1")
        with pytest.raises(ValueError, match="twice"):
            resolve_devices("3,gpu3")
    finally:
        del os.environ["CUDA_VISIBLE_DEVICES"]


def test_two_replicas_share_the_batches_survive_a_kill_and_swap_versions_together(
        start_broker: Any, test_models: Path, tmp_path: Path) -> None:
    base = tmp_path / "linear"
    base.mkdir()
    shutil.copytree(test_models / "linear" / "1", base / "1")
    broker = start_broker(["--model_name=linear", f"--model_base_path={base}", "--devices=cpu,cpu",
                           "--file_system_poll_wait_seconds=1"])
    broker.wait_available(["linear"])

    # ps: one model process per device, each seeing no GPU.
    titles = worker_titles(broker)
    assert sorted(titles) == ["tfbroker: worker:linear:1:cpu0", "tfbroker: worker:linear:1:cpu1"], titles
    assert all(len(pids) == 1 for pids in titles.values())
    for device in ("cpu0", "cpu1"):
        assert f"[worker:linear:1:{device} " in broker.log()
        assert f"on {device} (CUDA_VISIBLE_DEVICES='')" in broker.log()

    with Load(broker) as load:
        time.sleep(2.0)
        # Both replicas take batches (the broker's own per-replica counts).
        spread = replicas(broker, "linear")[1]
        assert [r["device"] for r in spread] == ["cpu0", "cpu1"]
        assert all(r["batches"] > 20 for r in spread), spread

        # SIGKILL one replica under load while it holds batches (stopped first, so that it
        # surely does): they move to the other, nothing fails.
        victim = titles["tfbroker: worker:linear:1:cpu1"][0]
        os.kill(victim, signal.SIGSTOP)
        wait_for(lambda: replicas(broker, "linear")[1][1]["in_flight"] > 0, 10, "the stopped replica to hold batches")
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: not pid_alive(victim), 10, "the killed replica to go")
        wait_for(lambda: all(r["ready"] and r["pid"] != victim for r in replicas(broker, "linear").get(1, [])),
                 60, "the replica to be back")
        assert [r["restarts"] for r in replicas(broker, "linear")[1]] == [0, 1]
        with Client(broker.address) as client:
            moved = client.stats()["requeued"]  # requests in flight on the killed replica, run by the other

        # A new version: both of its replicas load, then the old version's both go.
        shutil.copytree(test_models / "linear" / "2", base / "2")
        wait_for(lambda: version_states(broker, "linear").get(1) == "END", 120, "the swap to version 2")
        time.sleep(1.0)
    outcomes = load.outcomes
    failures = [o for o in outcomes if o[0] != 200]
    assert len(outcomes) > 200 and not failures, (len(failures), failures[:5])
    assert moved > 0
    # Every answer is its version's (y = 0.5 x + 2 or + 3 for x = 1).
    assert {(version, prediction) for _status, version, prediction in outcomes} == {("1", 2.5), ("2", 3.5)}
    assert sorted(worker_titles(broker)) == ["tfbroker: worker:linear:2:cpu0", "tfbroker: worker:linear:2:cpu1"]
    stats = broker.http.get("/v1/models/linear").json()  # still serving, status as TF Serving's
    assert [v["state"] for v in stats["model_version_status"] if v["version"] == "2"] == ["AVAILABLE"]


def test_a_bad_devices_flag_is_a_configuration_error(start_broker: Any, test_models: Path) -> None:
    broker = start_broker(["--model_name=linear", f"--model_base_path={test_models / 'linear'}",
                           "--devices=gpu7"], frontends=1)
    assert broker.process.wait(timeout=60) == 2
    assert "gpu7 is not visible" in broker.log()


def test_by_default_every_visible_gpu_gets_its_own_worker(start_broker: Any, test_models: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU layout without a GPU: the broker takes CUDA_VISIBLE_DEVICES=0,1 as two cards and
    starts a worker for each, each seeing only its own (TensorFlow finds no CUDA driver here and
    runs on the CPU, so the answers are still checked)."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    broker = start_broker(["--model_name=linear", f"--model_base_path={test_models / 'linear'}"], frontends=1)
    broker.wait_available(["linear"])
    titles = worker_titles(broker)
    assert sorted(titles) == ["tfbroker: worker:linear:2:gpu0", "tfbroker: worker:linear:2:gpu1"], titles
    assert "on gpu0 (CUDA_VISIBLE_DEVICES='0')" in broker.log()
    assert "on gpu1 (CUDA_VISIBLE_DEVICES='1')" in broker.log()
    for _ in range(10):
        assert broker.predict("linear", {"instances": [1.0]}).json() == {"predictions": [3.5]}
