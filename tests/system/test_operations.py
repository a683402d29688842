"""Running the broker as an operator would: limits, gunicorn frontends, restarts, shutdown, demo."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import httpx
import numpy as np
import pytest

from tfbroker.runtime.process import EXIT_CONFIG_ERROR, EXIT_FAULT
from broker.supervisor import terminate
from tfbroker import Client
from tests.conftest import (ROOT, BrokerProcess, children_of, descendants_of, free_port, pid_alive, process_title,
                            wait_for)


def batching_file(tmp: Path, **values: int) -> str:
    path = tmp / "batching.config"
    path.write_text("".join(f"{k} {{ value: {v} }}\n" for k, v in values.items()))
    return f"--batching_parameters_file={path}"


def test_lone_request_does_not_wait_and_a_full_queue_answers_503(start_broker: Any, test_models: Path,
                                                                   tmp_path: Path) -> None:
    tcp = f"tcp://127.0.0.1:{free_port()}"  # frontends and clients may reach the broker over TCP
    broker = start_broker([
        "--model_name=batch_reporter", f"--model_base_path={test_models / 'batch_reporter'}",
        f"--frontend_address={tcp}",
        batching_file(tmp_path, max_batch_size=4, batch_timeout_micros=2_000_000, max_enqueued_batches=1)],
        frontends=1)
    broker.address = tcp
    broker.wait_available(["batch_reporter"])
    started = time.monotonic()
    response = broker.predict("batch_reporter", {"instances": [1.0]})
    elapsed = time.monotonic() - started
    assert response.json() == {"predictions": [1.0]}
    assert elapsed < 1.5, f"a lone request waited {elapsed:.2f} s for company (timeout is 2 s)"

    with Client(broker.address, timeout_s=30) as client:
        def call(_: int) -> str:
            try:
                client.predict("batch_reporter", {"x": np.zeros(1, np.float32)})
                return "ok"
            except Exception as exc:  # noqa: BLE001 - the test counts error kinds
                return f"{type(exc).__name__}: {exc}"

        with ThreadPoolExecutor(32) as pool:
            outcomes = list(pool.map(call, range(64)))
    assert "ok" in outcomes
    full = "Unavailable: The batch scheduling queue to which this task was submitted is full"
    assert full in outcomes, sorted(set(outcomes))
    assert set(outcomes) <= {"ok", full}
    assert broker.predict("batch_reporter", {"instances": [1.0]}).status_code == 200


@pytest.fixture()
def gunicorn_frontends(tmp_path: Path) -> Iterator[Any]:
    processes: list[subprocess.Popen[bytes]] = []

    def start(address: str, workers: int = 2) -> tuple[subprocess.Popen[bytes], str]:
        port = free_port()
        env = {**os.environ, "TFBROKER_ADDRESS": address, "TFBROKER_FRONTENDS": str(workers),
               "TFBROKER_BIND": f"127.0.0.1:{port}", "TFBROKER_FRONTEND": "--rest_api_timeout_in_ms=10000"}
        log = open(tmp_path / "gunicorn.log", "wb")  # noqa: SIM115 - closed with the process
        process = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "ops/gunicorn.conf.py",
                                    "frontend.app:app"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        process.log = log  # type: ignore[attr-defined]
        processes.append(process)
        return process, f"http://127.0.0.1:{port}"

    yield start
    for process in processes:
        terminate(process, grace_s=30)
        process.log.close()  # type: ignore[attr-defined]


def test_gunicorn_frontends_without_batching_survive_a_broker_restart(
        start_broker: Any, gunicorn_frontends: Any, test_models: Path, tmp_path: Path) -> None:
    args = ["--model_name=batch_reporter", f"--model_base_path={test_models / 'batch_reporter'}",
            "--enable_batching=false"]
    broker: BrokerProcess = start_broker(args, frontends=0)
    gunicorn, url = gunicorn_frontends(broker.address, workers=2)
    http = httpx.Client(base_url=url, timeout=15)

    def ready() -> bool:
        try:
            return http.post("/v1/models/batch_reporter:predict", json={"instances": [1.0]}).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(ready, 120, "gunicorn frontends to serve through the broker")
        titles = sorted(process_title(pid) for pid in children_of(gunicorn.pid))
        assert titles == ["tfbroker: frontend:1", "tfbroker: frontend:2"]

        def batch_size(_: int) -> int:
            response = http.post("/v1/models/batch_reporter:predict", json={"instances": [1.0, 2.0]})
            return int(response.json()["predictions"][0])

        with ThreadPoolExecutor(16) as pool:
            assert set(pool.map(batch_size, range(64))) == {2}, "with batching off, requests run alone"

        # A new broker on the same sockets: the frontends reconnect by themselves.
        runtime_dir = broker.runtime_dir
        broker.process.send_signal(signal.SIGTERM)
        broker.process.wait(timeout=30)
        assert http.post("/v1/models/batch_reporter:predict", json={"instances": [1.0]}).status_code == 503
        second = start_broker([*args, f"--runtime_dir={runtime_dir}"], frontends=0)
        wait_for(ready, 120, "the frontends to reach the restarted broker")
        assert gunicorn.poll() is None
        assert second.pid != broker.pid
    finally:
        http.close()


def test_sigterm_stops_the_broker_and_all_its_children(start_broker: Any, test_models: Path) -> None:
    broker = start_broker(["--model_name=linear", f"--model_base_path={test_models / 'linear'}"], frontends=2)
    broker.wait_available(["linear"])
    children = descendants_of(broker.pid)
    assert len(children) == 5  # the zygote, one worker, a gunicorn master, two frontends
    broker.process.send_signal(signal.SIGTERM)
    assert broker.process.wait(timeout=30) == 0
    wait_for(lambda: not any(pid_alive(pid) for pid in children), 15, "children to exit")


def test_children_die_with_a_killed_broker(start_broker: Any, test_models: Path) -> None:
    broker = start_broker(["--model_name=linear", f"--model_base_path={test_models / 'linear'}"], frontends=1)
    broker.wait_available(["linear"])
    children = descendants_of(broker.pid)
    assert len(children) == 4  # the zygote, one worker, a gunicorn master, one frontend
    os.kill(broker.pid, signal.SIGKILL)
    broker.process.wait(timeout=10)
    wait_for(lambda: not any(pid_alive(pid) for pid in children), 15, "orphaned children to exit")
    # What the crash left in the runtime directory (sockets, lock) does not block the next start.
    left = sorted(p.name for p in broker.runtime_dir.iterdir())
    assert "broker.lock" in left, left
    again = start_broker(["--model_name=linear", f"--model_base_path={test_models / 'linear'}",
                          f"--runtime_dir={broker.runtime_dir}"], frontends=1)
    again.wait_available(["linear"])
    assert again.predict("linear", {"instances": [2.0]}).json() == {"predictions": [4.0]}


@pytest.mark.parametrize(("args", "message"), [
    (["--model_config_file=/nonexistent.config"], "cannot read model config file"),
    (["--model_name=m"], "go together"),
    (["--control_address=tcp://0.0.0.0:5599"], "set --curve_secret_key_file"),
    (["--frontend_address=tcp://0.0.0.0:5599"], "set --curve_secret_key_file"),
    (["--curve_secret_key_file=/nonexistent.key_secret"], "cannot read CURVE key file"),
    (["--version_swap_policy=fast"], "version_swap_policy must be"),
])
def test_bad_configuration_exits_with_a_clear_message(args: list[str], message: str, tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "broker", f"--runtime_dir={tmp_path}", *args],
                            cwd=ROOT, capture_output=True, timeout=60)
    assert result.returncode == EXIT_CONFIG_ERROR, "systemd's RestartPreventExitStatus names this code"
    assert message in result.stderr.decode()


def test_bad_batching_file_exits_with_a_clear_message(tmp_path: Path) -> None:
    config = tmp_path / "batching.config"
    config.write_text("max_batch_size { value: 8 }\nallowed_batch_sizes: 4\n")
    result = subprocess.run([sys.executable, "-m", "broker", f"--runtime_dir={tmp_path}", "--model_name=m",
                             "--model_base_path=/nowhere", f"--batching_parameters_file={config}"],
                            cwd=ROOT, capture_output=True, timeout=60)
    assert result.returncode == EXIT_CONFIG_ERROR
    assert "allowed_batch_sizes must end with max_batch_size (8)" in result.stderr.decode()


def test_a_second_broker_on_the_same_runtime_dir_is_refused(start_broker: Any, test_models: Path) -> None:
    broker = start_broker(["--model_name=linear", f"--model_base_path={test_models / 'linear'}"], frontends=0)
    wait_for(lambda: (broker.runtime_dir / "frontend.sock").exists(), 30, "the first broker's socket")
    result = subprocess.run([sys.executable, "-m", "broker", f"--runtime_dir={broker.runtime_dir}",
                             "--model_name=linear", f"--model_base_path={test_models / 'linear'}", "--frontends=0"],
                            cwd=ROOT, capture_output=True, timeout=60)
    assert result.returncode == EXIT_FAULT, "a runtime fault: systemd may restart it"
    assert "another broker is running" in result.stderr.decode()


def test_sigterm_lets_accepted_requests_finish(start_broker: Any, test_models: Path) -> None:
    broker = start_broker(["--model_name=batch_reporter", f"--model_base_path={test_models / 'batch_reporter'}"],
                          frontends=2)
    broker.wait_available(["batch_reporter"])
    stop_at = time.monotonic() + 3.0
    errors: list[str] = []

    def hammer(_: int) -> list[int]:
        # A fresh connection per request, so that a reset can only mean an accepted request
        # dropped: on a kept-alive connection, a request crossing the server's close of the
        # idle connection was never accepted, and HTTP leaves it to the client to retry.
        statuses = []
        with httpx.Client(base_url=broker.base_url, timeout=30, headers={"connection": "close"}) as http:
            while time.monotonic() < stop_at:
                try:
                    response = http.post("/v1/models/batch_reporter:predict", json={"instances": [1.0]})
                except httpx.ConnectError:
                    statuses.append(0)  # not accepted: the listener is closed
                    time.sleep(0.05)
                    continue
                except httpx.TransportError as exc:
                    # Accepted, then dropped (reset, closed without an answer): a lost request.
                    statuses.append(-1)
                    errors.append(repr(exc))
                    continue
                statuses.append(response.status_code)
        return statuses

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(hammer, i) for i in range(8)]
        time.sleep(1.0)
        broker.process.send_signal(signal.SIGTERM)
        statuses = [s for f in futures for s in f.result(timeout=60)]
    assert broker.process.wait(timeout=30) == 0
    assert statuses.count(200) > 0
    assert -1 not in statuses, f"accepted requests were dropped: {errors[:3]}"
    assert set(statuses) <= {0, 200}, f"accepted requests finish during shutdown: {sorted(set(statuses))}"


def test_a_hung_worker_is_killed_after_missed_heartbeats_and_restarted(start_broker: Any,
                                                                        test_models: Path) -> None:
    broker = start_broker(["--model_name=linear", f"--model_base_path={test_models / 'linear'}",
                           "--heartbeat_liveness=4"], frontends=1)  # 0.5 s x 4: dead after 2 s
    broker.wait_available(["linear"])
    [hung] = broker.pids_with("tfbroker: worker:linear:")
    os.kill(hung, signal.SIGSTOP)  # alive, but its loop sends nothing: like a stuck model call
    started = time.monotonic()
    response = broker.predict("linear", {"instances": [1.0]})
    assert response.status_code == 503, response.text
    assert time.monotonic() - started < 15, "the request failed fast, it did not wait for its deadline"
    wait_for(lambda: not pid_alive(hung), 15, "the hung worker to be killed")
    broker.wait_available(["linear"])
    assert broker.predict("linear", {"instances": [1.0]}).json() == {"predictions": [3.5]}


def test_two_brokers_on_one_host_need_only_different_ports(test_models: Path, tmp_path: Path) -> None:
    env = {**os.environ, "XDG_RUNTIME_DIR": str(tmp_path)}  # the default runtime directory's parent
    brokers = []
    try:
        for i in range(2):
            port = free_port()
            log = open(tmp_path / f"broker{i}.log", "wb")  # noqa: SIM115 - closed below
            process = subprocess.Popen(
                [sys.executable, "-m", "broker", "--model_name=linear", f"--model_base_path={test_models / 'linear'}",
                 f"--rest_api_port={port}", "--rest_api_host=127.0.0.1", "--frontends=1", f"--port={free_port()}"],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            brokers.append((process, port, log))
        for process, port, _ in brokers:
            def serving(port: int = port, process: subprocess.Popen[bytes] = process) -> bool:
                assert process.poll() is None, (tmp_path / "broker0.log").read_text() + (tmp_path / "broker1.log").read_text()
                try:
                    return httpx.post(f"http://127.0.0.1:{port}/v1/models/linear:predict",
                                      json={"instances": [2.0]}, timeout=5).status_code == 200
                except httpx.HTTPError:
                    return False

            wait_for(serving, 120, f"the broker on port {port}")
        assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == sorted(
            f"tfbroker-{os.getuid()}-{port}" for _, port, _ in brokers)
    finally:
        for process, _, log in brokers:
            terminate(process, grace_s=30)
            log.close()


def test_sighup_reloads_the_model_config_and_rolls_the_frontends(start_broker: Any, test_models: Path,
                                                                 tmp_path: Path) -> None:
    from tests.conftest import make_model_config

    config = tmp_path / "models.config"
    config.write_text(make_model_config({"first": test_models / "linear"}))
    broker = start_broker([f"--model_config_file={config}"], frontends=2)
    broker.wait_available(["first"])
    frontends = set(broker.pids_with("tfbroker: frontend:"))
    assert len(frontends) == 2
    config.write_text(make_model_config({"first": test_models / "linear", "second": test_models / "versions"}))
    os.kill(broker.pid, signal.SIGHUP)
    broker.wait_available(["first", "second"])
    wait_for(lambda: len(set(broker.pids_with("tfbroker: frontend:")) - frontends) == 2, 60,
             "two new frontends")
    assert not set(broker.pids_with("tfbroker: frontend:")) & frontends
    assert broker.process.poll() is None, "SIGHUP does not stop the broker"
    assert broker.predict("second", {"instances": [0.0]}).json() == {"predictions": [30.0]}


def test_curve_lets_known_keys_in_and_keeps_unknown_ones_out(start_broker: Any, test_models: Path,
                                                             tmp_path: Path) -> None:
    keys, allowed = tmp_path / "keys", tmp_path / "allowed"
    allowed.mkdir()
    for name in ("broker", "client", "stranger"):
        subprocess.run([sys.executable, "-m", "broker.ctl", "keygen", str(keys), name], cwd=ROOT, check=True,
                       capture_output=True, timeout=60)
    (allowed / "client.key").write_bytes((keys / "client.key").read_bytes())
    tcp = f"tcp://127.0.0.1:{free_port()}"
    broker = start_broker(["--model_name=linear", f"--model_base_path={test_models / 'linear'}",
                           f"--frontend_address={tcp}", f"--curve_secret_key_file={keys / 'broker.key_secret'}",
                           f"--curve_client_keys_dir={allowed}"], frontends=1)
    broker.wait_available(["linear"])  # the frontends and the worker use the broker's own keys
    assert broker.predict("linear", {"instances": [2.0]}).json() == {"predictions": [4.0]}

    def call_as(name: str) -> subprocess.CompletedProcess[str]:
        code = ("import numpy as np; from tfbroker import Client; "
                f"c = Client({tcp!r}, timeout_s=3, connect_timeout_s=3); "
                "print(c.predict('linear', {'x': np.array([2.0], np.float32)}).outputs['y'].tolist()); "
                "print(c.stats()['auth_refused'])")
        env = {**os.environ, "TFBROKER_CURVE_SECRET_KEY_FILE": str(keys / f"{name}.key_secret"),
               "TFBROKER_CURVE_SERVER_KEY_FILE": str(keys / "broker.key")}
        return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=60)

    known = call_as("client")
    assert known.returncode == 0, known.stderr
    assert known.stdout.split("\n")[0] == "[4.0]"
    stranger = call_as("stranger")
    assert stranger.returncode != 0 and "Unavailable" in stranger.stderr, stranger.stderr[-500:]
    known = call_as("client")
    assert known.returncode == 0 and int(known.stdout.split("\n")[1]) >= 1, "the refusal was counted"
    plain = subprocess.run([sys.executable, "-m", "broker.ctl", f"--runtime_dir={broker.runtime_dir}", "--timeout_s=2",
                            "status"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert plain.returncode == 3, "the control socket takes CURVE clients only"
    with_keys = subprocess.run([sys.executable, "-m", "broker.ctl", f"--runtime_dir={broker.runtime_dir}",
                                f"--curve_secret_key_file={keys / 'client.key_secret'}",
                                f"--curve_server_key_file={keys / 'broker.key'}", "status"],
                               cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert with_keys.returncode == 0, with_keys.stderr
    assert "model linear" in with_keys.stdout
