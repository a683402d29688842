"""Load generators: wrk (closed loop, one thread, C: it takes little of the CPU it measures)
for HTTP, and bench.client_load for the Python client (closed loop, asyncio; it runs in
Python and so takes a share of the same two cores: its own CPU is reported beside)."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any

from bench.servers import ROOT

WRK_SCRIPT = """
bodies = {%s}
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
%s
wrk.body = bodies[1]
if #bodies > 1 then
  request = function() return wrk.format(nil, nil, nil, bodies[math.random(#bodies)]) end
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %%d, "duration_s": %%f, "errors": %%d, "p50_ms": %%f, "p99_ms": %%f}\\n',
    summary.requests, summary.duration / 1e6, e.connect + e.read + e.write + e.timeout + e.status,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000))
end
"""


def wrk(url: str, body: str | bytes | list[str], concurrency: int, duration_s: float,
        headers: dict[str, str] | None = None) -> dict[str, Any]:
    """One closed-loop wrk run; with several bodies each request takes one at random. A body
    in bytes (binary: the Open Inference Protocol's binary tensors) is read from a file."""
    binary = None
    if isinstance(body, bytes):
        with tempfile.NamedTemporaryFile("wb", suffix=".bin", delete=False) as data:
            data.write(body)
        binary = data.name
        bodies_lua = f'(function() local f = io.open("{binary}", "rb"); local b = f:read("*a"); f:close(); ' \
                     'return b end)()'
    else:
        bodies_lua = ",".join(f"[==[{b}]==]" for b in ([body] if isinstance(body, str) else body))
    header_lua = "\n".join(f'wrk.headers["{name}"] = "{value}"' for name, value in (headers or {}).items())
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(WRK_SCRIPT % (bodies_lua, header_lua))
    try:
        before = _children_cpu_s()
        result_ = subprocess.run(
            ["wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(duration_s))}s", "--timeout", "10s",
             "-s", script.name, url], capture_output=True, timeout=duration_s + 60)
        out, err = result_.stdout, result_.stderr
        load_cpu = _children_cpu_s() - before
    finally:
        os.unlink(script.name)
        if binary is not None:
            os.unlink(binary)
    last = out.decode().strip().splitlines()[-1] if out else ""
    if not last.startswith("{"):
        raise RuntimeError(f"wrk failed: {err.decode()[-500:]}")
    result = json.loads(last)
    result["load_cpu_s"] = load_cpu
    return result


def _children_cpu_s() -> float:
    """CPU of this process's reaped children: around one wrk run, that is wrk's own."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def client_load(address: str, probe: str, instances: int, concurrency: int, duration_s: float) -> dict[str, Any]:
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.client_load", address, probe, str(instances), str(concurrency),
         str(duration_s)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    started = time.monotonic()
    out, err = process.communicate(timeout=duration_s + 120)
    if process.returncode != 0:
        raise RuntimeError(f"client load failed: {err.decode()[-800:]}")
    result = json.loads(out.decode().strip().splitlines()[-1])
    result["wall_s"] = time.monotonic() - started
    return result


