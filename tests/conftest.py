"""Fixtures that start real brokers (real processes, ipc:// sockets in temp dirs, loopback HTTP).

tests/unit/ holds the tests without processes or network sockets (marked ``unit``), tests/system/
those that start the real thing (marked ``system``): ``pytest -m unit`` runs in seconds."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import httpx
import numpy as np
import pytest

from broker.supervisor import terminate
from tfbroker.runtime.settings import default_runtime_dir

ROOT = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        kind = Path(str(item.fspath)).relative_to(ROOT / "tests").parts[0]
        if kind in ("unit", "system"):
            item.add_marker(kind)
# TF Serving's own test data, beside the project in its workspace only: a test may compare with
# it when it is there; every model a test serves is made by tests/model_factory.py.
TESTDATA = ROOT.parent / "shared" / "testdata"


def debian_binary(name: str, package: str) -> str:
    """A program from Debian's packages (nginx, redis-server). Tests install nothing: .ci/run
    installs what CI needs; elsewhere the test skips and names the package to install."""
    binary = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")
    if binary is None:
        pytest.skip(f"{name} is not installed: install Debian's package {package} (.ci/run does) to run this test")
    return binary


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(condition: Any, timeout_s: float, what: str, interval_s: float = 0.05) -> Any:
    """Poll ``condition`` until it returns something truthy; fail loudly after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


def process_title(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def descendants_of(pid: int) -> list[int]:
    """Children, grandchildren (the frontends under the broker's gunicorn), and so on."""
    found, frontier = [], [pid]
    while frontier:
        frontier = [child for parent in frontier for child in children_of(parent)]
        found.extend(frontier)
    return found


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def make_model_config(models: dict[str, Path], labels: dict[str, dict[str, int]] | None = None) -> str:
    entries = []
    for name, path in models.items():
        label_text = "".join(f' version_labels {{ key: "{k}" value: {v} }}'
                             for k, v in (labels or {}).get(name, {}).items())
        entries.append(f'config {{ name: "{name}" base_path: "{path}" model_platform: "tensorflow"{label_text} }}')
    return "model_config_list {\n  " + "\n  ".join(entries) + "\n}\n"


class BrokerProcess:
    """``python -m broker`` in a temp runtime dir, with helpers to reach and inspect it."""

    def __init__(self, tmp: Path, args: list[str], frontends: int = 2, *, default_ports: bool = False) -> None:
        """``default_ports``: as a user starts it, on ports 8501 and 8500 with the default
        runtime directory (the docs' commands assume them), else on free ports of its own."""
        tmp.mkdir(parents=True, exist_ok=True)
        self.log_path = tmp / "broker.log"
        self.frontends = frontends
        if default_ports:
            self.runtime_dir = Path(default_runtime_dir(8501))
            self.port, self.grpc_port = 8501, 8500
            argv = [sys.executable, "-m", "broker", f"--frontends={frontends}", *args]
        else:
            # ipc:// paths must stay short (about 100 bytes): not under pytest's long tmp paths.
            self.runtime_dir = Path(tempfile.mkdtemp(prefix="tfb-"))
            self.port = free_port()
            # gRPC too, on a port of its own (unless the test names one): TF Serving's 8500 is one per host.
            self.grpc_port = next((int(a.split("=", 1)[1]) for a in args if a.startswith("--port=")), free_port())
            argv = [sys.executable, "-m", "broker", f"--runtime_dir={self.runtime_dir}",
                    f"--rest_api_port={self.port}", "--rest_api_host=127.0.0.1", f"--frontends={frontends}",
                    "--heartbeat_interval_s=0.5", *([] if any(a.startswith("--port=") for a in args)
                                                    else [f"--port={self.grpc_port}"]), *args]
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        # A process group of its own, as a shell gives a command it starts: a test can signal the
        # whole group as a terminal's Ctrl-C does, and never reaches pytest's.
        self.process = subprocess.Popen(argv, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                        process_group=0)
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.address = f"ipc://{self.runtime_dir}/frontend.sock"
        self.http = httpx.Client(base_url=self.base_url, timeout=30.0)

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_available(self, models: list[str], timeout_s: float = 120.0) -> None:
        def ready() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"broker exited with {self.process.returncode}:\n{self.log()[-3000:]}")
            for name in models:
                try:
                    response = self.http.get(f"/v1/models/{name}", timeout=2.0)
                except httpx.HTTPError:
                    return False
                states = [v["state"] for v in response.json().get("model_version_status", [])]
                if "AVAILABLE" not in states:
                    return False
            return True

        wait_for(ready, timeout_s, f"models {models} to be AVAILABLE")
        # The frontends start once the models are AVAILABLE (the ports open then): all of them up.
        wait_for(lambda: len(self.pids_with("tfbroker: frontend:")) >= self.frontends, 60,
                 f"{self.frontends} frontends")

    def roles(self) -> dict[str, list[int]]:
        """Process titles of the broker's descendants, by title."""
        found: dict[str, list[int]] = {}
        for pid in descendants_of(self.pid):
            if pid_alive(pid):
                found.setdefault(process_title(pid), []).append(pid)
        return found

    def pids_with(self, prefix: str) -> list[int]:
        return [pid for title, pids in self.roles().items() if title.startswith(prefix) for pid in pids]

    def predict(self, model: str, body: dict[str, Any], suffix: str = "") -> httpx.Response:
        return self.http.post(f"/v1/models/{model}{suffix}:predict", json=body)

    def stop(self) -> int:
        self.http.close()
        code = terminate(self.process, grace_s=30)
        self._log.close()
        shutil.rmtree(self.runtime_dir, ignore_errors=True)
        return code


def make_models(factory: str, directory: Path) -> Path:
    """Run a model-making script of tests/ (in a child: TensorFlow stays out of pytest)."""
    result = subprocess.run([sys.executable, str(ROOT / "tests" / factory), str(directory)],
                            capture_output=True, timeout=300)
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-3000:]
    return directory


@pytest.fixture(scope="session")
def test_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_models("model_factory.py", tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def user_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The models of the kinds users bring (tests/user_models.py), made once."""
    return make_models("user_models.py", tmp_path_factory.mktemp("user_models"))


@contextlib.contextmanager
def serving(tmp: Path, models: dict[str, Path], args: Sequence[str] = (), frontends: int = 1,
            labels: dict[str, dict[str, int]] | None = None) -> Iterator[BrokerProcess]:
    """A broker serving ``models`` (a model config file in ``tmp``) until the block ends."""
    (tmp / "models.config").write_text(make_model_config(models, labels))
    broker = BrokerProcess(tmp, [f"--model_config_file={tmp / 'models.config'}", *args], frontends=frontends)
    try:
        broker.wait_available(list(models))
        yield broker
    finally:
        stop_and_check(broker)


def stop_and_check(broker: BrokerProcess) -> None:
    """Stop a broker and check that none of its children outlives it."""
    children = descendants_of(broker.pid)
    broker.stop()
    wait_for(lambda: not any(pid_alive(p) for p in children), 15, "the broker's children to exit")


@pytest.fixture(scope="session")
def demo_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's models (what ``python -m broker`` serves with no model flags), made once."""
    directory = tmp_path_factory.mktemp("demo_models")
    subprocess.run([sys.executable, "-m", "workers.demo_models", str(directory)], cwd=ROOT, check=True,
                   capture_output=True, timeout=600)
    return directory


@pytest.fixture()
def start_broker(tmp_path: Path) -> Iterator[Any]:
    """Start brokers for one test; every one is stopped (and checked for strays) at the end."""
    started: list[BrokerProcess] = []

    def start(args: list[str], frontends: int = 2) -> BrokerProcess:
        broker = BrokerProcess(tmp_path / f"b{len(started)}", args, frontends)
        started.append(broker)
        return broker

    yield start
    for broker in started:
        stop_and_check(broker)


def reference_outputs(model: Path, batches: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """What TensorFlow computes in-process for each batch (in a child, to keep TF out of pytest)."""
    work = Path(os.environ.get("TMPDIR", "/tmp"))
    stamp = f"{os.getpid()}-{time.monotonic_ns()}"
    inputs, outputs = work / f"ref-in-{stamp}.npz", work / f"ref-out-{stamp}.npz"
    np.savez(inputs, **{f"{i:04d}/{name}": value for i, batch in enumerate(batches) for name, value in batch.items()})
    try:
        subprocess.run([sys.executable, str(ROOT / "tests" / "reference.py"), str(model), str(inputs), str(outputs)],
                       check=True, capture_output=True, timeout=120)
        with np.load(outputs) as data:
            results: list[dict[str, np.ndarray]] = [{} for _ in batches]
            for key in data.files:
                index, name = key.split("/")
                results[int(index)][name] = data[key]
        return results
    finally:
        inputs.unlink(missing_ok=True)
        outputs.unlink(missing_ok=True)
