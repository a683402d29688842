"""The tfbroker the tuner measures: the user's model served from a work directory, each batching
setting a version of its own (the user's version directory linked file by file, plus a
``batching_params.pbtxt``), swapped in hot, so trying a batching setting costs a swap (under a
second with the zygote), not a start; the broker's own flags (batches in flight, frontends)
take a restart. The broker's environment is the tuner's: TF_NUM_INTRAOP_THREADS and the like
apply as they will when you run it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psutil

from broker.tune.settings import Setting

START_TIMEOUT_S = 180.0
SWAP_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0


class TuneError(RuntimeError):
    """The tuner cannot go on (the model does not load, the broker does not start)."""


def latest_version_dir(base_path: str) -> Path:
    """The newest numeric version directory of a TF Serving model base path."""
    base = Path(base_path)
    if not base.is_dir():
        raise TuneError(f"{base_path}: no such directory")
    versions = sorted((int(p.name), p) for p in base.iterdir() if p.name.isdigit() and p.is_dir())
    if not versions:
        hint = " (it holds a SavedModel: give its parent, with numeric version directories)" \
            if (base / "saved_model.pb").exists() else ""
        raise TuneError(f"{base_path} has no numeric version directory{hint}")
    return versions[-1][1]


class TunedBroker:
    def __init__(self, model_name: str, source: Path, work: Path, extra_args: list[str]) -> None:
        self.model_name = model_name
        self.source = source
        self.base = work / "models" / model_name
        self.base.mkdir(parents=True)
        self.log_path = work / "broker.log"
        self.extra_args = extra_args
        self.version = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.runtime_dir = ""
        self.port = 0
        self.flags: list[str] = []  # the running broker's own flags (Setting.broker_flags)

    @property
    def path(self) -> str:
        return f"/v1/models/{self.model_name}:predict"

    def apply(self, setting: Setting) -> None:
        """Serve ``setting``: a new version with its batching, swapped in; a restart first when
        its broker flags differ from the running broker's."""
        self._add_version(setting)
        if self.process is None or self.flags != setting.broker_flags():
            self.stop()
            self._start(setting)
        self._wait_serving(self.version, SWAP_TIMEOUT_S)

    def metadata(self) -> dict[str, Any]:
        return dict(self._get(f"/v1/models/{self.model_name}/metadata"))

    def stop(self) -> None:
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(STOP_TIMEOUT_S)
        except ProcessLookupError:
            pass
        self.process = None
        shutil.rmtree(self.runtime_dir, ignore_errors=True)

    # --- implementation ---

    def _add_version(self, setting: Setting) -> None:
        self.version += 1
        directory = self.base / str(self.version)
        directory.mkdir()
        for entry in self.source.iterdir():
            if entry.name != "batching_params.pbtxt":
                (directory / entry.name).symlink_to(entry.resolve())
        (directory / "batching_params.pbtxt").write_text(setting.batching_parameters())

    def _start(self, setting: Setting) -> None:
        self.runtime_dir = tempfile.mkdtemp(prefix="tfb-tune-")  # ipc:// paths must stay short
        self.port = _free_port()
        argv = [sys.executable, "-m", "broker", f"--model_name={self.model_name}", f"--model_base_path={self.base}",
                f"--runtime_dir={self.runtime_dir}", f"--rest_api_port={self.port}", "--rest_api_host=127.0.0.1",
                "--port=0", "--enable_batching", "--enable_per_model_batching_parameters",
                "--file_system_poll_wait_seconds=0.1", *setting.broker_flags(), *self.extra_args]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, process_group=0)
        self.flags = setting.broker_flags()
        self._wait_serving(self.version, START_TIMEOUT_S)
        self._wait_frontends(setting.frontends, START_TIMEOUT_S)

    def _wait_serving(self, version: int, timeout_s: float) -> None:
        """Until ``version`` is AVAILABLE and every other has ended (the swap is over)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                raise TuneError(f"the broker exited; its warnings and errors:\n{self.log_tail()}")
            try:
                statuses = {s["version"]: s for s in
                            self._get(f"/v1/models/{self.model_name}").get("model_version_status", [])}
            except (OSError, ValueError):
                statuses = {}
            states = {v: s["state"] for v, s in statuses.items()}
            if states.get(str(version)) == "AVAILABLE" and all(
                    state == "END" for v, state in states.items() if v != str(version)):
                return
            if states.get(str(version)) == "END":
                why = statuses[str(version)].get("status", {}).get("error_message", "")
                raise TuneError(f"version {version} of the model did not load: {why}\n"
                                f"The broker's warnings and errors:\n{self.log_tail()}")
            time.sleep(0.1)  # polling a server's state: there is nothing to wait on but its answer
        raise TuneError(f"version {version} did not serve within {timeout_s:.0f} s; the broker's warnings and "
                        f"errors:\n{self.log_tail()}")

    def _wait_frontends(self, count: int, timeout_s: float) -> None:
        """Until every frontend runs: the first answers before the others have started, and a
        load measured then would be one frontend's."""
        assert self.process is not None
        broker = psutil.Process(self.process.pid)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            titles = []
            for child in broker.children(recursive=True):
                try:
                    titles.append(" ".join(child.cmdline()))
                except psutil.Error:
                    continue
            if sum(title.startswith("tfbroker: frontend:") for title in titles) >= count:
                return
            time.sleep(0.1)  # the titles are the only sign; nothing to wait on
        raise TuneError(f"{count} frontends did not start within {timeout_s:.0f} s")

    def _get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as response:
            return json.loads(response.read())

    def log_tail(self) -> str:
        """The log's warnings and errors, the last of them (the frontends' start-up says little)."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join([line for line in lines if " ERROR " in line or " WARNING " in line][-20:] or lines[-20:])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
