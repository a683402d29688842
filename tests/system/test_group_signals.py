"""Stopping as a terminal and systemd do: Ctrl-C sends SIGINT to the whole foreground process
group, ``kill -TERM -- -PGID`` (and systemd's KillMode=control-group) SIGTERM to every
process. Either must stop the demo as SIGINT to the broker alone does: exit 0 within 5 s,
every line INFO, no child restarted, no accepted request failed, nothing left behind."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.conftest import BrokerProcess, descendants_of, pid_alive, wait_for
from tests.system.test_logs import ready_commands

STOP_WITHIN_S = 5.0


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_to_the_process_group_stops_the_demo_cleanly_under_load(signum: signal.Signals, demo_models: Path,
                                                                        tmp_path: Path) -> None:
    broker = BrokerProcess(tmp_path, [f"--demo_models_dir={demo_models}"], frontends=2)
    try:
        broker.wait_available(["half_plus_two", "mlp", "text"], timeout_s=180)
        wait_for(lambda: "tfbroker: ready" in broker.log(), 30, "the ready message")
        children = descendants_of(broker.pid)
        stopping = False
        errors: list[str] = []

        answered: list[list[int]] = [[] for _ in range(6)]

        def load(index: int, url: str, body: bytes) -> list[int]:
            # A fresh connection per request: a reset can then only mean an accepted request dropped.
            statuses = answered[index]
            with httpx.Client(base_url=broker.base_url, timeout=30, headers={"connection": "close"}) as http:
                while not stopping or len(statuses) < 5:
                    try:
                        statuses.append(http.post(url, content=body).status_code)
                    except httpx.ConnectError:
                        if stopping:
                            break  # the listener is closed: not accepted
                        raise
                    except httpx.TransportError as exc:
                        statuses.append(-1)
                        errors.append(repr(exc))
            return statuses

        calls = [(url.replace("localhost", "127.0.0.1"), body) for url, body in ready_commands(broker.log())] * 2
        assert len(calls) == 6, calls
        before = len(broker.log().splitlines())
        with ThreadPoolExecutor(len(calls)) as pool:
            futures = [pool.submit(load, index, url, body) for index, (url, body) in enumerate(calls)]
            wait_for(lambda: all(len(statuses) >= 3 for statuses in answered) or any(f.done() for f in futures),
                     30, "answers on every connection")
            signalled = time.monotonic()
            os.killpg(broker.pid, signum)
            stopping = True
            code = broker.process.wait(timeout=60)
            took = time.monotonic() - signalled
            statuses = [s for f in futures for s in f.result(timeout=60)]
        assert code == 0
        print(f"stopped {took:.2f} s after {signum.name} to the process group")
        assert took < STOP_WITHIN_S, f"the stop took {took:.1f} s"
        assert -1 not in statuses, f"accepted requests were dropped: {errors[:3]}"
        assert set(statuses) == {200}, f"every accepted request is answered 200: {sorted(set(statuses))}"
        stop = [line for line in broker.log().splitlines()[before:] if line.strip()]
        assert stop and all(" INFO " in line or " DEBUG " in line for line in stop), stop
        assert not [line for line in stop if "restart" in line or "exited with code" in line], stop
        wait_for(lambda: not any(pid_alive(pid) for pid in children), 15, "the broker's children to exit")
        assert not broker.runtime_dir.exists(), list(broker.runtime_dir.iterdir())
    finally:
        broker.stop()
