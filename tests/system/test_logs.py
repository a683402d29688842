"""The demo, and logs an operator can read (issue 13): one line per event in one format for every process,
JSON on request, and TensorFlow's start-up notes kept out unless asked for."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest

from tfbroker.runtime.logs import log_child_lines, pass_on_tensorflow_output
from tests.conftest import wait_for

ABSL_LINE = re.compile(r"^[IWEF]\d{4} [\d:.]+\s+\d+ \S+\]")
TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) "
                       r"\[(broker|zygote|worker:[\w.-]+:\d+|iobatcher:\d+|frontends|frontend:\d+) \d+\] [\w.]+: ")
NOISE = ("absl::InitializeLog", "is deprecated", "Restoring parameters", "oneDNN custom operations",
         "cudart_stub", "cpu_feature_guard")


def event_lines(log: str) -> list[str]:
    """The log without what the broker prints for the person who started it (stdout)."""
    return [line for line in log.splitlines()
            if line.strip() and not line.startswith(("tfbroker: ready", "tfbroker: serving", "  curl", "Status page"))]


def ready_commands(log: str) -> list[tuple[str, bytes]]:
    """The ready message's example calls: (URL, body) of each ``curl -d`` line."""
    calls = []
    for line in log.splitlines():
        match = re.match(r"^  curl -d (?:'(?P<inline>.*)'|@(?P<file>\S+)) (?P<url>\S+)$", line)
        if match:
            body = match["inline"].encode() if match["inline"] is not None else Path(match["file"]).read_bytes()
            calls.append((match["url"], body))
    return calls


def test_demo_mode_serves_its_models_and_its_log_reads_as_one_line_per_event(start_broker: Any,
                                                                             tmp_path: Path) -> None:
    broker = start_broker([f"--demo_models_dir={tmp_path / 'demo'}"], frontends=2)
    broker.wait_available(["half_plus_two", "mlp", "text"], timeout_s=180)
    assert broker.predict("half_plus_two", {"instances": [1.0, 2.0, 5.0]}).json() == {"predictions": [2.5, 3.0, 4.5]}
    response = broker.predict("mlp", {"instances": [[0.0] * 16]})
    assert response.status_code == 200 and len(response.json()["predictions"][0]) == 4
    wait_for(lambda: "curl -d" in broker.log(), 10, "the ready message")

    # The ready message: one short line per model, each a call that answers 200 (the text
    # model's with words and a user from its tables).
    message = broker.log()[broker.log().index("tfbroker: ready"):].splitlines()
    assert all(len(line) <= 200 for line in message[:5]), message[:5]
    calls = dict(ready_commands(broker.log()))
    assert sorted(url.rsplit("/", 1)[1] for url in calls) == ["half_plus_two:predict", "mlp:predict", "text:predict"]
    for url, body in calls.items():
        answer = httpx.post(url.replace("localhost", "127.0.0.1"), content=body, timeout=10)
        assert answer.status_code == 200, (url, body, answer.text)
        if url.endswith("text:predict"):
            assert answer.json()["predictions"][0]["oov"] == 0, "the example's words are in the vocabulary"
    lines = event_lines(broker.log())
    odd = [line for line in lines if not TEXT_LINE.match(line)]
    assert not odd, odd
    assert not [line for line in lines if any(noise in line for noise in NOISE)]
    roles = {TEXT_LINE.match(line).group(2).split(":")[0] for line in lines}  # type: ignore[union-attr]
    assert roles >= {"broker", "worker", "iobatcher", "frontends", "frontend"}, roles
    assert sum("tfbroker.worker: loaded" in line for line in lines) == 3

    # SIGTERM to the whole process group, as `kill -TERM -- -PGID` and systemd's KillMode=control-group
    # send it (Ctrl-C's SIGINT to the group: tests/system/test_group_signals.py): every process stops
    # with no stack dump, no error, and nothing left behind.
    before = len(broker.log().splitlines())
    os.killpg(broker.pid, signal.SIGTERM)
    assert broker.process.wait(timeout=60) == 0
    stop = broker.log().splitlines()[before:]
    assert stop, "the stop is logged"
    for word in ("Traceback", "Current thread", "File \"", "ERROR", "WARNING", "CRITICAL", "Bad file descriptor",
                 "was sent"):
        assert not [line for line in stop if word in line], (word, stop)
    processes = [TEXT_LINE.match(line).group(2) for line in stop]  # type: ignore[union-attr]
    assert all(" INFO " in line for line in stop), stop
    assert len(processes) == len(set(processes)), f"one line per process: {stop}"
    assert {p.split(":")[0] for p in processes} == {"broker", "worker", "iobatcher"}, stop  # gunicorn's: DEBUG
    assert not broker.runtime_dir.exists(), list(broker.runtime_dir.iterdir())


def test_json_logs_from_every_process(start_broker: Any, test_models: Path) -> None:
    broker = start_broker(["--model_name=mlp", f"--model_base_path={test_models / 'mlp'}", "--log_format=json"])
    broker.wait_available(["mlp"])
    assert broker.predict("mlp", {"instances": [[0.0] * 8]}).status_code == 200
    wait_for(lambda: "tfbroker: serving" in broker.log() or "curl" in broker.log(), 10, "the ready message")
    records = []
    for line in event_lines(broker.log()):
        record = json.loads(line)  # every line is one JSON object
        assert set(record) >= {"time", "level", "role", "pid", "logger", "message"}, record
        records.append(record)
    roles = {r["role"].split(":")[0] for r in records}
    assert roles >= {"broker", "worker", "frontends", "frontend"}, roles
    assert any(r["role"] == "worker:mlp:1" and r["message"].startswith("loaded ") for r in records)
    assert not [r for r in records if any(noise in r["message"] for noise in NOISE)]


def test_verbose_shows_tensorflows_own_logs(start_broker: Any, test_models: Path) -> None:
    broker = start_broker(["--model_name=mlp", f"--model_base_path={test_models / 'mlp'}", "--verbose"],
                          frontends=1)
    broker.wait_available(["mlp"])
    assert any(ABSL_LINE.match(line) for line in broker.log().splitlines()), broker.log()[-2000:]


def test_tensorflow_output_keeps_errors_and_drops_notes(caplog: pytest.LogCaptureFixture) -> None:
    captured = b"\n".join([
        b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
        b"I0000 00:00:1796035711.059807   11425 port.cc:153] oneDNN custom operations are on.",
        b"I0000 00:00:1796035711.107513   11425 cpu_feature_guard.cc:227] This TensorFlow binary is optimized.",
        b"To enable the following instructions: AVX2 FMA, in other operations, rebuild TensorFlow.",
        b"E0000 00:00:1796035712.960900   11425 cuda_platform.cc:52] failed call to cuInit: UNKNOWN ERROR (303)",
        b"E0000 00:00:1796035712.960900   11425 op_kernel.cc:1840] OP_REQUIRES failed: out of memory",
        b"F0000 00:00:1796035712.960900   11425 check.cc:12] Check failed: x == y",
        b"a line some library printed",
    ])
    with caplog.at_level(logging.INFO, logger="tensorflow.cc"):
        pass_on_tensorflow_output(captured, cpu_only=True)
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("ERROR", "OP_REQUIRES failed: out of memory (op_kernel.cc:1840)"),
        ("CRITICAL", "Check failed: x == y (check.cc:12)"),
        ("WARNING", "a line some library printed"),
    ]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tensorflow.cc"):
        pass_on_tensorflow_output(captured, cpu_only=False)  # a GPU host: a failed cuInit is news
    assert "failed call to cuInit" in caplog.records[0].getMessage()


def test_a_childs_lines_become_records_of_its_role_at_tensorflows_level(caplog: pytest.LogCaptureFixture) -> None:
    lines = [
        b"W0000 00:00:1796035712.960900   11425 local_rendezvous.cc:412] Local rendezvous is aborting with "
        b"status: INVALID_ARGUMENT: indices[0,0] = 126 is not in [0, 100)",
        b"\t [[{{function_node __inference___call___460}}{{node embedding/GatherV2}}]]",
        b"F0000 00:00:1796035712.960900   11425 tensor_format.h:428] Check failed: index >= 0",
        b"*** Check failure stack trace: ***",
        b"    @     0x7f5d38c92d30  tensorflow::MklDnnConvUtil::GetInputSizeInMklOrder()",
        b"E0000 00:00:1796035712.960900   11425 cuda_platform.cc:52] failed call to cuInit: UNKNOWN ERROR (303)",
        b"a line some library printed",
    ]
    with caplog.at_level(logging.INFO, logger="tensorflow.cc"):
        log_child_lines(lines, "worker:m:1", 4242, cpu_only=True)
    assert [(r.levelname, r.role, r.process, r.getMessage()) for r in caplog.records] == [  # type: ignore[attr-defined]
        ("WARNING", "worker:m:1", 4242, "Local rendezvous is aborting with status: INVALID_ARGUMENT: indices[0,0] = 126 "
                                        "is not in [0, 100) (local_rendezvous.cc:412)"),
        ("CRITICAL", "worker:m:1", 4242, "Check failed: index >= 0 (tensor_format.h:428)"),
        ("WARNING", "worker:m:1", 4242, "a line some library printed"),
    ]
