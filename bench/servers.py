"""Servers under test, one at a time: start, wait until they answer, measure their process tree, stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from broker.supervisor import terminate

ROOT = Path(__file__).resolve().parent.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# Every server's TensorFlow gets one thread per op, and runs a graph's ops in the calling
# thread (inter-op -1: no hand-off to a pool thread per call): on a small host the model
# shares the cores with HTTP and the broker (or with the other naive workers), and spinning
# thread pools only take CPU from them. The same settings for every server; the in-process
# limit keeps TF's default.
SERVER_ENV = {"TF_CPP_MIN_LOG_LEVEL": "2", "TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "-1"}


def tree(pid: int) -> list[int]:
    """pid and all its descendants."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found, frontier = [pid], [pid]
    while frontier:
        frontier = [child for child, parent in parents.items() if parent in frontier]
        found.extend(frontier)
    return found


def title(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def role(pid: int) -> str:
    text = title(pid)
    if "bin/mosec " in text:
        return "mosec-http"
    if "bench.litserve_app" in text:
        return "litserve"
    if "bench.rayserve_app" in text or "ray::" in text or "/ray/" in text or text.startswith(("ray", "gcs_server")):
        return "ray"
    if "bench.mosec_app" in text or "multiprocessing" in text:
        return "workers"
    if "granian" in text:
        return "frontends"
    for prefix, name in (("tfbroker: frontend", "frontends"), ("tfbroker: broker", "broker"),
                         ("tfbroker: worker", "worker"), ("tfbroker: iobatcher", "iobatcher"),
                         ("gunicorn: master", "master"), ("nginx: ", "nginx"),
                         ("gunicorn: worker", "workers")):
        if text.startswith(prefix):
            return name
    return "other"


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def host_cpu_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of every CPU since boot, from /proc/stat: idle and iowait are
    not busy. The share of the host a run kept busy says whether it was bound by CPU (near
    100 %) or by its own latency (CPU left idle while requests waited)."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
    total = sum(ticks[:8])  # guest time is counted in user time already
    return total - idle, total


def pss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def cpu_by_role(root: int) -> dict[str, float]:
    totals: dict[str, float] = {}
    for pid in tree(root):
        totals[role(pid)] = totals.get(role(pid), 0.0) + cpu_seconds(pid)
    return totals


def total_pss_mb(root: int) -> float:
    return sum(pss_bytes(pid) for pid in tree(root)) / 2**20


@dataclass
class Server:
    name: str
    argv: list[str]
    url: str
    env: dict[str, str] = field(default_factory=dict)
    address: str = ""  # the broker's ZeroMQ address, for the Python client
    process: subprocess.Popen[bytes] | None = None
    log_path: str = ""
    probe: dict[str, Any] = field(default_factory=lambda: {"instances": [[0.0] * 256]})  # answered when up

    def start(self, timeout_s: float = 180.0) -> None:
        fd, self.log_path = tempfile.mkstemp(prefix=f"bench-{self.name}-", suffix=".log")
        self.process = subprocess.Popen(self.argv, cwd=ROOT, env={**os.environ, **self.env},
                                        stdout=fd, stderr=subprocess.STDOUT)
        os.close(fd)
        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=5) as http:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"{self.name} exited; see {self.log_path}")
                try:
                    if http.post(self.url, json=self.probe).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
        raise RuntimeError(f"{self.name} did not answer within {timeout_s:.0f} s; see {self.log_path}")

    def stop(self) -> None:
        if self.process is None:
            return
        pids = tree(self.process.pid)
        terminate(self.process, grace_s=30)
        for pid in pids[1:]:  # nothing may outlive the run
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        os.unlink(self.log_path)


def naive_server(model_dir: str, workers: int, port: int) -> Server:
    return Server(
        name=f"naive-{workers}",
        argv=[sys.executable, "-m", "gunicorn", "-k", "uvicorn_worker.UvicornWorker", "-w", str(workers),
              "-b", f"127.0.0.1:{port}", "--timeout", "120", "bench.naive_app:app"],
        url=f"http://127.0.0.1:{port}/v1/models/mlp:predict",
        env={"BENCH_MODEL_DIR": model_dir, **SERVER_ENV})


def raw_asgi_server(workers: int, port: int) -> Server:
    """bench/raw_asgi.py under gunicorn and uvicorn as the frontends run: the HTTP and JSON floor."""
    return Server(
        name=f"raw-asgi-{workers}",
        argv=[sys.executable, "-m", "gunicorn", "-k", "uvicorn_worker.UvicornWorker", "-w", str(workers),
              "-b", f"127.0.0.1:{port}", "bench.raw_asgi:app"],
        url=f"http://127.0.0.1:{port}/v1/models/mlp:predict", env=SERVER_ENV)


def mosec_server(model_dir: str, port: int, json: str = "default") -> Server:
    """mosec with its own JSON (``default``) or with orjson (``orjson``): bench/mosec_app.py."""
    return Server(
        name="mosec" if json == "default" else f"mosec-{json}",
        argv=[sys.executable, "-m", "bench.mosec_app", "--port", str(port), "--address", "127.0.0.1",
              "--log-level", "warning"],
        url=f"http://127.0.0.1:{port}/v1/models/mlp:predict",
        env={"BENCH_MODEL_DIR": model_dir, "BENCH_MOSEC_JSON": json, **SERVER_ENV})


def litserve_server(model_dir: str, port: int) -> Server:
    """LitServe with its batching on: bench/litserve_app.py (2 API servers, one model worker)."""
    return Server(name="litserve", argv=[sys.executable, "-m", "bench.litserve_app", "--port", str(port)],
                  url=f"http://127.0.0.1:{port}/v1/models/mlp:predict",
                  env={"BENCH_MODEL_DIR": model_dir, **SERVER_ENV})


def rayserve_server(model_dir: str, port: int) -> Server:
    """Ray Serve with @serve.batch: bench/rayserve_app.py (a local Ray, one model replica)."""
    return Server(name="rayserve", argv=[sys.executable, "-m", "bench.rayserve_app", "--port", str(port)],
                  url=f"http://127.0.0.1:{port}/v1/models/mlp:predict",
                  env={"BENCH_MODEL_DIR": model_dir, **SERVER_ENV})


def tfbroker_granian_server(base_path: str, frontends: int, port: int, runtime_dir: str,
                            interface: str = "asgi") -> Server:
    """The broker alone (--frontends=0) and its frontends under granian (a Rust HTTP server)
    instead of gunicorn and uvicorn: the ASGI app, or the same API through RSGI (frontend/rsgi.py)."""
    broker = (f"{sys.executable} -m broker --model_name=mlp --model_base_path={base_path} --frontends=0 "
              f"--rest_api_port={port} --runtime_dir={runtime_dir} --log_level=warning")
    app = "frontend.rsgi:app" if interface == "rsgi" else "frontend.app:app"
    granian = (f"{sys.executable} -m granian --interface {interface} --workers {frontends} --host 127.0.0.1 "
               f"--port {port} --log-level warning {app}")
    return Server(
        name=f"tfbroker-{'rsgi' if interface == 'rsgi' else 'granian'}-{frontends}",
        argv=["sh", "-c", f"{broker} & exec {granian}"],  # the broker ends up a child of granian
        url=f"http://127.0.0.1:{port}/v1/models/mlp:predict",
        env={**SERVER_ENV, "TFBROKER_ADDRESS": f"ipc://{runtime_dir}/frontend.sock"},
        address=f"ipc://{runtime_dir}/frontend.sock")


def nginx_site(prefix: Path, upstreams: list[str], listen: str, workers: int = 2) -> Path:
    """ops/nginx/tfbroker.conf with its upstream servers and listen address replaced, under a
    main nginx.conf of its own in ``prefix`` (pid, logs and temp files there): the file to
    pass to ``nginx -p PREFIX -c``."""
    site = (ROOT / "ops" / "nginx" / "tfbroker.conf").read_text()
    servers = "\n".join(f"    server {address} max_fails=0;" for address in upstreams)
    site = site.replace("    server unix:/run/tfbroker-frontends/http.sock max_fails=0;", servers)
    site = site.replace("listen 8501;", f"listen {listen};")
    prefix.mkdir(parents=True, exist_ok=True)
    (prefix / "tfbroker.conf").write_text(site)
    (prefix / "nginx.conf").write_text(
        f"user root;\nworker_processes {workers};\npid {prefix}/nginx.pid;\nerror_log {prefix}/error.log warn;\n"
        "events { worker_connections 4096; }\n"
        f"http {{\n  access_log off;\n  client_body_temp_path {prefix}/body;\n  proxy_temp_path {prefix}/proxy;\n"
        f"  include {prefix}/tfbroker.conf;\n}}\n")
    return prefix / "nginx.conf"


def tfbroker_nginx_server(base_path: str, frontends: int, port: int, runtime_dir: str) -> Server:
    """tfbroker's frontends behind nginx with ops/nginx/tfbroker.conf (its upstream pointed at
    their TCP port): the proxy's cost. nginx runs 2 worker processes, as on a 2-core host."""
    prefix = Path(runtime_dir) / "nginx"
    conf = nginx_site(prefix, [f"127.0.0.1:{port + 1}"], f"127.0.0.1:{port}")
    nginx = f"nginx -p {prefix} -c {conf} -g 'daemon off;'"
    broker = tfbroker_server(base_path, frontends, port + 1, runtime_dir)
    return Server(name=f"tfbroker-nginx-{frontends}", argv=["sh", "-c", f"{nginx} & exec {' '.join(broker.argv)}"],
                  url=f"http://127.0.0.1:{port}/v1/models/mlp:predict", env=broker.env, address=broker.address)


def tfbroker_server(base_path: str, frontends: int, port: int, runtime_dir: str,
                    extra: list[str] | None = None, model: str = "mlp") -> Server:
    return Server(
        name=f"tfbroker-{frontends}",
        argv=[sys.executable, "-m", "broker", f"--model_name={model}", f"--model_base_path={base_path}",
              f"--rest_api_port={port}", "--rest_api_host=127.0.0.1", f"--frontends={frontends}",
              f"--runtime_dir={runtime_dir}", "--log_level=warning", "--port=0", *(extra or [])],
        url=f"http://127.0.0.1:{port}/v1/models/{model}:predict",
        env=SERVER_ENV,
        address=f"ipc://{runtime_dir}/frontend.sock")
