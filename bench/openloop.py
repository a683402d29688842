"""An HTTP load generator in asyncio: open loop (requests start on a schedule, whatever the
server does) or closed loop (N connections, each sending its next request on the last answer).

    python -m bench.openloop URL BODY_FILE --rate 8000 --duration_s 10
    python -m bench.openloop URL BODY_FILE --closed 64 --duration_s 10

Open loop is how traffic arrives in production: a slow server does not slow its callers
down. Each request's latency is counted from when it was due, not from when it was sent, so
the generator's own lag is never hidden (no coordinated omission). Prints one JSON line:
offered and answered rates, per-status counts, p50/p99 of the 200s and of the 503s,
transport errors (a reset or a timeout) and requests the generator could not start on time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

import numpy as np

MAX_CONNECTIONS = 4096
TIMEOUT_S = 10.0


class Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[int] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0 or self.waiter is None:
            return
        head = bytes(self.buffer[:end]).lower()
        start = head.find(b"content-length:")
        length = int(head[start + 15:head.find(b"\r\n", start) if b"\r\n" in head[start:] else None]) if start >= 0 else 0
        if len(self.buffer) < end + 4 + length:
            return
        status = int(self.buffer[9:12])
        del self.buffer[:end + 4 + length]
        if not self.waiter.done():
            self.waiter.set_result(status)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionResetError("the server closed the connection"))

    async def request(self, payload: bytes) -> int:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(payload)
        return await asyncio.wait_for(self.waiter, TIMEOUT_S)


class Generator:
    def __init__(self, host: str, port: int, payload: bytes) -> None:
        self.host, self.port, self.payload = host, port, payload
        self.idle: list[Connection] = []
        self.open = 0
        self.latencies: dict[int, list[float]] = {}
        self.errors: dict[str, int] = {}
        self.not_started = 0

    async def one(self, due: float) -> None:
        loop = asyncio.get_running_loop()
        conn = None
        while self.idle and conn is None:
            conn = self.idle.pop()
            if conn.closed:
                conn = None
        try:
            if conn is None:
                if self.open >= MAX_CONNECTIONS:
                    self.not_started += 1
                    return
                self.open += 1
                _, conn = await loop.create_connection(Connection, self.host, self.port)
            status = await conn.request(self.payload)
        except (OSError, asyncio.TimeoutError) as exc:
            self.errors[type(exc).__name__] = self.errors.get(type(exc).__name__, 0) + 1
            if conn is not None and conn.transport is not None:
                conn.transport.close()
            self.open -= 1
            return
        self.latencies.setdefault(status, []).append(time.monotonic() - due)
        self.idle.append(conn)

    async def open_loop(self, rate: float, duration_s: float) -> float:
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task[None]] = set()
        start = time.monotonic() + 0.05
        count = int(rate * duration_s)
        sent = 0
        while sent < count:
            now = time.monotonic()
            due_until = min(count, int((now - start) * rate) + 1)
            while sent < due_until:
                task = loop.create_task(self.one(start + sent / rate))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                sent += 1
            await asyncio.sleep(0.001)
        if tasks:
            await asyncio.wait(tasks, timeout=TIMEOUT_S + 5)
        return duration_s

    async def closed_loop(self, connections: int, duration_s: float) -> float:
        stop = time.monotonic() + duration_s

        async def worker() -> None:
            while time.monotonic() < stop:
                await self.one(time.monotonic())

        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(connections)))
        return time.monotonic() - started

    def summary(self, elapsed_s: float, offered: float | None) -> dict[str, Any]:
        def pct(values: list[float], q: float) -> float:
            return round(float(np.percentile(values, q)) * 1000, 2) if values else 0.0

        ok, rejected = self.latencies.get(200, []), self.latencies.get(503, [])
        answered = sum(len(v) for v in self.latencies.values())
        total = answered + sum(self.errors.values()) + self.not_started
        return {
            "offered_per_s": offered, "answered_per_s": round(answered / elapsed_s, 1),
            "ok_per_s": round(len(ok) / elapsed_s, 1), "statuses": {str(k): len(v) for k, v in self.latencies.items()},
            "ok_p50_ms": pct(ok, 50), "ok_p99_ms": pct(ok, 99), "rejected_p99_ms": pct(rejected, 99),
            "rejected_share": round(len(rejected) / total, 4) if total else 0.0,
            "transport_errors": self.errors, "not_started": self.not_started, "connections": self.open,
        }


def http_payload(url: str, body: bytes) -> tuple[str, int, bytes]:
    rest = url.split("://", 1)[1]
    hostport, _, path = rest.partition("/")
    host, _, port = hostport.partition(":")
    head = (f"POST /{path} HTTP/1.1\r\nHost: {hostport}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    return host, int(port or 80), head + body


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.openloop", description=__doc__.split("\n\n")[0])
    parser.add_argument("url")
    parser.add_argument("body_file")
    parser.add_argument("--rate", type=float, default=0.0, help="open loop: requests started per second")
    parser.add_argument("--closed", type=int, default=0, help="closed loop: this many connections")
    parser.add_argument("--duration_s", type=float, default=10.0)
    args = parser.parse_args(argv)
    with open(args.body_file, "rb") as fh:
        host, port, payload = http_payload(args.url, fh.read())
    generator = Generator(host, port, payload)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    if args.closed:
        elapsed = asyncio.run(generator.closed_loop(args.closed, args.duration_s))
        print(json.dumps(generator.summary(elapsed, None)))
    else:
        asyncio.run(generator.open_loop(args.rate, args.duration_s))
        print(json.dumps(generator.summary(args.duration_s, args.rate)))


if __name__ == "__main__":
    main()
