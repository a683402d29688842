"""Model workers forked from the zygote (workers/zygote.py, broker/zygote.py), with real
brokers: the zygote touched no device, hundreds of forks load and answer, a failed load
leaves it healthy, a killed zygote stops nothing (workers spawn until it is back), twenty
models from one zygote, and --worker_start=spawn as before. Timings are asserted loosely
here; bench/zygote.py measures them."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from broker.supervisor import AdoptedProcess
from tests.conftest import ROOT, BrokerProcess, make_model_config, pid_alive, process_title, wait_for


def status(broker: BrokerProcess) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-m", "broker.ctl", f"--runtime_dir={broker.runtime_dir}", "--json",
                           "status"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    answer: dict[str, Any] = json.loads(done.stdout)
    return answer


def replicas(answer: dict[str, Any], model: str, version: int | None = None) -> list[dict[str, Any]]:
    """The replicas of the model's AVAILABLE versions (or of one version, whatever its state)."""
    found = next(m for m in answer["models"] if m["name"] == model)
    return [r for v in found["versions"] if (v["state"] == "AVAILABLE" if version is None else v["version"] == version)
            for r in v["replicas"]]


def ppid_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
        return int(fh.read().rsplit(")", 1)[1].split()[1])


def answers_linear(broker: BrokerProcess, model: str, b: float = 2.0) -> bool:
    """y = 0.5x + b (tests/model_factory.py: linear/1 has b 2, linear/2 b 3)."""
    response = broker.predict(model, {"instances": [1.0, 2.0]})
    return response.status_code == 200 and response.json()["predictions"][0] == 0.5 + b


def test_workers_are_forks_of_a_zygote_that_initialised_no_device(start_broker: Any, test_models: Path) -> None:
    broker = start_broker(["--model_name=linear", f"--model_base_path={test_models / 'linear'}"], frontends=1)
    broker.wait_available(["linear"])
    answer = status(broker)
    zygote = answer["broker"]["zygote"]
    assert zygote["state"] == "ready" and zygote["forks"] >= 1
    report = zygote["report"]
    # Its own report at start: no eager context, no device listed, and its threads named.
    assert report["eager_context"] is False and report["devices_listed"] is False
    assert report["python_threads"] == ["MainThread"], "no threads of ours"
    assert report["threads"] and report["threads"][0]["tid"] == zygote["pid"]
    assert "eager context: False; devices listed: False" in broker.log()
    assert process_title(zygote["pid"]) == "tfbroker: zygote"
    (replica,) = replicas(answer, "linear")
    assert replica["started"] == "forked"
    # The worker is the broker's own child (its subreaper), in a session of its own (its
    # go-between's, which exited): a signal to the broker's group or the zygote's never reaches it.
    assert ppid_of(replica["pid"]) == broker.pid
    assert os.getsid(replica["pid"]) not in (os.getsid(broker.pid), os.getsid(zygote["pid"]))
    assert answers_linear(broker, "linear", b=3.0)


def test_hundreds_of_forks_each_load_and_answer(start_broker: Any, test_models: Path, tmp_path: Path) -> None:
    """Four models unloaded and loaded again over the Open Inference Protocol's repository
    extension, side by side, until the zygote has forked 200 workers: each loads, answers
    a prediction, and none hangs (every wait is bounded)."""
    names = [f"m{i}" for i in range(4)]
    for name in names:
        shutil.copytree(test_models / "linear" / "1", tmp_path / name / "1")
    (tmp_path / "models.config").write_text(make_model_config({n: tmp_path / n for n in names}))
    broker = start_broker([f"--model_config_file={tmp_path / 'models.config'}", "--enable_model_control",
                           "--worker_load_timeout_s=60"], frontends=1)
    broker.wait_available(names)
    forks_at_start = status(broker)["broker"]["zygote"]["forks"]
    cycles = 50
    failures: list[str] = []

    def cycle(name: str) -> None:
        with httpx.Client(base_url=broker.base_url, timeout=30) as http:
            for i in range(cycles):
                assert http.post(f"/v2/repository/models/{name}/unload").status_code == 200
                wait_for(lambda: gone(http, name), 30, f"{name} to unload (its worker gone)")
                assert http.post(f"/v2/repository/models/{name}/load").status_code == 200
                wait_for(lambda: http.get(f"/v2/models/{name}/ready").status_code == 200, 30,
                         f"{name}'s fork {i} to be ready")
                response = http.post(f"/v1/models/{name}:predict", json={"instances": [1.0, 2.0]})
                if response.status_code != 200 or response.json()["predictions"] != [2.5, 3.0]:
                    failures.append(f"{name} cycle {i}: {response.status_code} {response.text[:200]}")

    def gone(http: httpx.Client, name: str) -> bool:
        index = http.post("/v2/repository/index", json={}).json()
        return all(e["state"] == "UNAVAILABLE" for e in index if e["name"] == name)

    errors: list[BaseException] = []

    def run(name: str) -> None:
        try:
            cycle(name)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(name,)) for name in names]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert not any(t.is_alive() for t in threads), "a cycle hung"
    assert not errors, errors[:3]
    assert not failures, failures[:5]
    zygote = status(broker)["broker"]["zygote"]
    assert zygote["forks"] - forks_at_start == cycles * len(names)
    assert zygote["restarts"] == 0 and zygote["spawned_without"] == 0
    print(f"{cycles * len(names)} fork-load-answer cycles in {time.monotonic() - started:.1f} s")


def test_a_killed_worker_is_forked_again_at_once(start_broker: Any, test_models: Path) -> None:
    broker = start_broker(["--model_name=linear", f"--model_base_path={test_models / 'linear'}"], frontends=1)
    broker.wait_available(["linear"])
    (before,) = replicas(status(broker), "linear")
    os.kill(before["pid"], signal.SIGKILL)
    killed = time.monotonic()
    wait_for(lambda: answers_linear(broker, "linear", b=3.0), 30, "the model to answer again")
    back_s = time.monotonic() - killed
    (after,) = replicas(status(broker), "linear")
    assert after["pid"] != before["pid"] and after["started"] == "forked"
    assert back_s < 10, f"answering again took {back_s:.1f} s (bench/zygote.py measures it)"


def test_a_swap_serves_the_new_version_from_a_fork(start_broker: Any, test_models: Path, tmp_path: Path) -> None:
    base = tmp_path / "swap"
    shutil.copytree(test_models / "linear" / "1", base / "1")
    broker = start_broker(["--model_name=swap", f"--model_base_path={base}", "--file_system_poll_wait_seconds=0.1"],
                          frontends=1)
    broker.wait_available(["swap"])
    staging = tmp_path / "staging"
    shutil.copytree(test_models / "linear" / "2", staging)
    staging.rename(base / "2")  # as a version is published: one rename
    appeared = time.monotonic()
    wait_for(lambda: answers_linear(broker, "swap", b=3.0), 60, "version 2 to answer")
    swap_s = time.monotonic() - appeared
    (replica,) = replicas(status(broker), "swap", 2)
    assert replica["started"] == "forked"
    assert swap_s < 10, f"the swap took {swap_s:.1f} s (bench/zygote.py measures it)"


def test_a_failed_load_in_a_fork_leaves_the_zygote_serving(start_broker: Any, test_models: Path,
                                                             tmp_path: Path) -> None:
    models = {"linear": test_models / "linear", "broken": test_models / "broken"}
    (tmp_path / "models.config").write_text(make_model_config(models))
    broker = start_broker([f"--model_config_file={tmp_path / 'models.config'}"], frontends=1)
    broker.wait_available(["linear"])
    wait_for(lambda: "failed to load" in broker.log() or "cannot load model broken" in broker.log(), 60,
             "the broken model's load to fail")
    zygote = status(broker)["broker"]["zygote"]
    assert zygote["state"] == "ready" and zygote["restarts"] == 0 and pid_alive(zygote["pid"])
    assert zygote["forks"] >= 2
    # The next fork after the failed one loads and answers: the new version of a swap.
    base = tmp_path / "swap"
    shutil.copytree(test_models / "linear" / "1", base / "1")
    (tmp_path / "models.config").write_text(make_model_config({**models, "swap": base}))
    assert subprocess.run([sys.executable, "-m", "broker.ctl", f"--runtime_dir={broker.runtime_dir}",
                           "reload-config"], cwd=ROOT, capture_output=True, timeout=60).returncode == 0
    broker.wait_available(["swap"])
    assert answers_linear(broker, "swap")
    (replica,) = replicas(status(broker), "swap")
    assert replica["started"] == "forked" and status(broker)["broker"]["zygote"]["pid"] == zygote["pid"]


def test_a_killed_zygote_stops_no_model(start_broker: Any, test_models: Path, tmp_path: Path) -> None:
    """Workers keep serving without it; the next worker spawns while it is down; then it is
    back and the one after is forked again."""
    base = tmp_path / "swap"
    shutil.copytree(test_models / "linear" / "1", base / "1")
    broker = start_broker(["--model_name=swap", f"--model_base_path={base}", "--file_system_poll_wait_seconds=0.2"],
                          frontends=1)
    broker.wait_available(["swap"])
    stop = threading.Event()
    statuses: list[int] = []

    def load() -> None:
        with httpx.Client(base_url=broker.base_url, timeout=30) as http:
            while not stop.is_set():
                statuses.append(http.post("/v1/models/swap:predict", json={"instances": [1.0]}).status_code)

    client = threading.Thread(target=load)
    client.start()
    try:
        first = status(broker)["broker"]["zygote"]
        os.kill(first["pid"], signal.SIGKILL)
        shutil.copytree(test_models / "linear" / "2", base / "2")  # a new version while it is down
        wait_for(lambda: any(r["pid"] for r in replicas(status(broker), "swap"))
                 and {v["version"]: v["state"] for m in status(broker)["models"] if m["name"] == "swap"
                      for v in m["versions"]}.get(2) == "AVAILABLE", 60, "version 2 to serve")
        (spawned,) = replicas(status(broker), "swap", 2)
        assert spawned["started"] == "spawned", "the zygote was down: a fresh interpreter"
        wait_for(lambda: status(broker)["broker"]["zygote"]["state"] == "ready", 60, "the zygote to be back")
        back = status(broker)["broker"]["zygote"]
        assert back["pid"] != first["pid"] and back["restarts"] == 1
        shutil.copytree(test_models / "linear" / "1", base / "3")
        wait_for(lambda: any(v["version"] == 3 and v["state"] == "AVAILABLE" for m in status(broker)["models"]
                             if m["name"] == "swap" for v in m["versions"]), 60, "version 3 to serve")
        (forked,) = replicas(status(broker), "swap", 3)
        assert forked["started"] == "forked"
    finally:
        stop.set()
        client.join(timeout=60)
    assert statuses and set(statuses) == {200}, f"{sum(s != 200 for s in statuses)} of {len(statuses)} failed"
    assert "the zygote (pid" in broker.log() and "workers start as fresh interpreters" in broker.log()


def test_twenty_models_from_one_zygote(start_broker: Any, test_models: Path, tmp_path: Path) -> None:
    names = [f"hpt{i:02d}" for i in range(20)]
    for name in names:
        shutil.copytree(test_models / "linear" / "1", tmp_path / name / "1")
    (tmp_path / "models.config").write_text(make_model_config({n: tmp_path / n for n in names}))
    broker = start_broker([f"--model_config_file={tmp_path / 'models.config'}"], frontends=1)
    broker.wait_available(names, timeout_s=240)
    answer = status(broker)
    started = [r["started"] for name in names for r in replicas(answer, name)]
    assert started == ["forked"] * 20
    assert all(answers_linear(broker, name) for name in names)
    assert answer["broker"]["zygote"]["forks"] == 20


def test_spawn_start_runs_no_zygote(start_broker: Any, test_models: Path) -> None:
    broker = start_broker(["--model_name=linear", f"--model_base_path={test_models / 'linear'}",
                           "--worker_start=spawn"], frontends=1)
    broker.wait_available(["linear"])
    answer = status(broker)
    assert answer["broker"]["zygote"] is None and answer["broker"]["worker_start"] == "spawn"
    (replica,) = replicas(answer, "linear")
    assert replica["started"] == "spawned"
    assert not broker.pids_with("tfbroker: zygote")
    assert answers_linear(broker, "linear", b=3.0)


def test_an_adopted_process_is_waited_for_and_signalled_by_its_pidfd() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    adopted = AdoptedProcess(child.pid)  # a child of this process, as a fork is of the broker
    assert adopted.poll() is None
    adopted.send_signal(signal.SIGTERM)
    assert adopted.wait(timeout=30) == -signal.SIGTERM
    adopted.send_signal(signal.SIGKILL)  # after its exit: nothing reaches whatever has its pid now
    assert adopted.poll() == -signal.SIGTERM
    child.returncode = adopted.returncode  # reaped by the adopted handle, not by Popen
    assert child.stdin is not None
    child.stdin.close()


REAP_CHECK = """
import os, subprocess, sys
from broker.supervisor import reap_strays

def exited(pid):
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)  # blocks until it has exited, leaves it unreaped

stray = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
exited(stray.pid)
print(reap_strays(set()))
kept = subprocess.Popen([sys.executable, "-c", "raise SystemExit(5)"])
exited(kept.pid)
print(reap_strays({kept.pid}), kept.wait(timeout=5))
print(stray.pid, kept.pid)
"""


def test_strays_are_reaped_and_supervised_children_keep_their_status() -> None:
    """In a process of its own: reaping strays must not reach pytest's other children."""
    done = subprocess.run([sys.executable, "-c", REAP_CHECK], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    first, second, pids = done.stdout.splitlines()
    stray, kept = map(int, pids.split())
    assert first == f"[({stray}, 3)]"
    assert second == "[] 5", "a supervised child's exit status is left for its own handle"
