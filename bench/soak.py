"""``python -m bench.soak``: ten minutes of mixed traffic while versions swap and processes die.

Traffic (threads, each counting its own outcomes): predictions on a model whose versions
swap, status and metadata reads, bad requests, slow clients that dribble their body, and
clients that disconnect before their answer. Meanwhile a new version directory appears every
``--swap_every_s`` (the oldest is deleted), and every ``--kill_every_s`` a model worker or a
frontend is SIGKILLed at random.

Prints counts: answers by status, requests lost (no answer: a reset or a timeout; must be 0,
except those whose frontend was SIGKILLed while it held them, counted apart), answers
that do not match the version that made them (must be 0), and the broker's and the
frontends' RSS and open file descriptors at the start and at the end (flat). Exits 1 when a
request was lost or an answer was wrong.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

from bench.servers import ROOT, Server, tfbroker_server, tree

PORT = 18601
# A request in flight on a frontend that is SIGKILLed is reset; one that ends this soon after
# a frontend kill is counted apart from the lost ones.
KILL_WINDOW_S = 2.0


def make_version(base: Path, version: int) -> None:
    """y = 0.5x + version: every answer names the version that made it."""
    staging = base.parent / f".staging-{version}"
    subprocess.run([sys.executable, "-c", "from workers.demo_models import save_linear; "
                    f"save_linear({str(staging)!r}, a=0.5, b={float(version)})"], cwd=ROOT, check=True,
                   capture_output=True)
    staging.rename(base / str(version))  # appears whole


class Soak:
    def __init__(self, server: Server, duration_s: float) -> None:
        self.server = server
        self.base_url = server.url.rsplit("/v1/", 1)[0]
        self.started = time.monotonic()
        self.stop_at = self.started + duration_s
        self.statuses: Counter[str] = Counter()
        self.lost: list[str] = []
        self.reset_by_kill = 0
        self.wrong: list[str] = []
        self.frontend_kills: list[float] = []
        self.events: list[str] = []
        self.lock = threading.Lock()

    def running(self) -> bool:
        return time.monotonic() < self.stop_at

    def count(self, what: str) -> None:
        with self.lock:
            self.statuses[what] += 1

    def failed(self, error: Exception) -> None:
        now = time.monotonic()
        with self.lock:
            if any(0 <= now - t <= KILL_WINDOW_S for t in self.frontend_kills):
                self.reset_by_kill += 1
            else:
                self.lost.append(repr(error))

    # --- traffic ---

    def predictions(self) -> None:
        with httpx.Client(base_url=self.base_url, timeout=30) as http:
            while self.running():
                x = random.choice([0.0, 2.0, 4.0])
                try:
                    response = http.post("/v1/models/swapped:predict", json={"instances": [x]})
                except httpx.HTTPError as exc:
                    self.failed(exc)
                    continue
                self.count(f"predict {response.status_code}")
                if response.status_code == 200:
                    version = int(response.headers["x-model-version"])
                    if response.json() != {"predictions": [0.5 * x + version]}:
                        self.wrong.append(f"version {version}, x {x}: {response.text}")

    def reads(self) -> None:
        with httpx.Client(base_url=self.base_url, timeout=30) as http:
            while self.running():
                path = random.choice(["/v1/models/swapped", "/v1/models/swapped/metadata", "/v1/models/nope"])
                try:
                    self.count(f"read {http.get(path).status_code}")
                except httpx.HTTPError as exc:
                    self.failed(exc)
                time.sleep(0.01)

    def bad_requests(self) -> None:
        bodies = [b"{", b"[]", b'{"instances": [[1.0], 2.0]}', b'{"instances": ["a"]}', b'{"inputs": {"y": [1]}}',
                  b'{"instances": [' + b"[" * 40 + b"1" + b"]" * 40 + b"]}"]
        with httpx.Client(base_url=self.base_url, timeout=30) as http:
            while self.running():
                try:
                    response = http.post("/v1/models/swapped:predict", content=random.choice(bodies))
                    self.count(f"bad {response.status_code}")
                except httpx.HTTPError as exc:
                    self.failed(exc)
                time.sleep(0.01)

    def slow_clients(self) -> None:
        host, port = "127.0.0.1", int(self.base_url.rsplit(":", 1)[1])
        body = b'{"instances": [2.0]}'
        while self.running():
            try:
                with socket.create_connection((host, port), timeout=30) as sock:
                    sock.sendall(b"POST /v1/models/swapped:predict HTTP/1.1\r\nHost: x\r\n"
                                 b"Content-Type: application/json\r\nConnection: close\r\n"
                                 + f"Content-Length: {len(body)}\r\n\r\n".encode())
                    for i in range(len(body)):  # a byte every 50 ms
                        sock.sendall(body[i:i + 1])
                        time.sleep(0.05)
                    answer = b""
                    while chunk := sock.recv(65536):
                        answer += chunk
                if not answer.startswith(b"HTTP/1.1 "):
                    raise ConnectionError(f"no answer to a slow client: {answer[:80]!r}")
                self.count(f"slow {answer[9:12].decode()}")
            except OSError as exc:
                self.failed(exc)

    def disconnecting_clients(self) -> None:
        while self.running():
            try:
                httpx.post(f"{self.base_url}/v1/models/swapped:predict", json={"instances": [1.0]}, timeout=0.002)
                self.count("disconnecting answered")
            except httpx.TimeoutException:
                self.count("disconnecting gave up")
            except httpx.HTTPError as exc:
                self.failed(exc)
            time.sleep(0.02)

    # --- chaos ---

    def swaps(self, base: Path, every_s: float) -> None:
        version = max(int(p.name) for p in base.iterdir() if p.name.isdigit())
        while self.running():
            time.sleep(every_s)
            version += 1
            make_version(base, version)
            oldest = min(int(p.name) for p in base.iterdir() if p.name.isdigit())
            if oldest < version - 1:
                shutil.rmtree(base / str(oldest))
            self.events.append(f"{self.elapsed()} version {version} added")

    def kills(self, every_s: float) -> None:
        assert self.server.process is not None
        while self.running():
            time.sleep(every_s)
            roles = {pid: title(pid) for pid in tree(self.server.process.pid)}
            kind = random.choice(["tfbroker: worker:swapped", "tfbroker: frontend:"])
            victims = [pid for pid, name in roles.items() if name.startswith(kind)]
            if not victims:
                continue
            victim = random.choice(victims)
            if "frontend" in kind:
                with self.lock:
                    self.frontend_kills.append(time.monotonic())
            os.kill(victim, signal.SIGKILL)
            self.events.append(f"{self.elapsed()} SIGKILL {roles[victim]} (pid {victim})")

    def elapsed(self) -> str:
        return f"[{time.monotonic() - self.started:.0f} s]"


def title(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def footprint(server: Server) -> dict[str, dict[str, float]]:
    """RSS (MB) and open file descriptors of the broker and of the frontends (summed)."""
    assert server.process is not None
    found: dict[str, dict[str, float]] = {}
    for pid in tree(server.process.pid):
        name = title(pid)
        role = "broker" if name == "tfbroker: broker" else "frontends" if "frontend" in name else None
        if role is None:
            continue
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            fds = len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            continue
        rss = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS")) / 1024
        entry = found.setdefault(role, {"rss_mb": 0.0, "fds": 0})
        entry["rss_mb"] = round(entry["rss_mb"] + rss, 1)
        entry["fds"] += fds
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration_s", type=float, default=600.0)
    parser.add_argument("--swap_every_s", type=float, default=30.0)
    parser.add_argument("--kill_every_s", type=float, default=45.0)
    parser.add_argument("--clients", type=int, default=6, help="threads sending predictions")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="tfb-soak-"))
    base = work / "swapped"
    base.mkdir()
    make_version(base, 1)
    server = tfbroker_server(str(base), 2, PORT, str(work / "rt"), ["--file_system_poll_wait_seconds=0.5"],
                             model="swapped")
    server.probe = {"instances": [1.0]}
    try:
        server.start()
        time.sleep(2)
        start = footprint(server)
        soak = Soak(server, args.duration_s)
        threads = [threading.Thread(target=soak.predictions) for _ in range(args.clients)]
        threads += [threading.Thread(target=t) for t in (soak.reads, soak.bad_requests, soak.slow_clients,
                                                          soak.disconnecting_clients)]
        threads += [threading.Thread(target=soak.swaps, args=(base, args.swap_every_s)),
                    threading.Thread(target=soak.kills, args=(args.kill_every_s,))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        time.sleep(3)
        end = footprint(server)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    report = {"answers": dict(sorted(soak.statuses.items())), "lost": len(soak.lost),
              "lost_examples": soak.lost[:5], "reset_by_frontend_kill": soak.reset_by_kill,
              "wrong_answers": len(soak.wrong), "wrong_examples": soak.wrong[:5], "events": soak.events,
              "footprint_start": start, "footprint_end": end}
    print(json.dumps(report, indent=2))
    return 1 if soak.lost or soak.wrong else 0


if __name__ == "__main__":
    sys.exit(main())
