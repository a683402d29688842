"""A closed-loop HTTP load for the tuner: ``concurrency`` keep-alive connections, each sending
its next request when the last is answered, for ``duration_s``. Raw asyncio streams (no HTTP
library): it shares the cores it measures, so it must cost little per request."""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class LevelResult:
    concurrency: int
    requests: int
    errors: int  # any answer but 200, and connections lost
    rps: float
    p50_ms: float
    p99_ms: float


def run_level(host: str, port: int, path: str, bodies: list[bytes], concurrency: int,
              duration_s: float) -> LevelResult:
    return asyncio.run(_level(host, port, path, bodies, concurrency, duration_s))


async def _level(host: str, port: int, path: str, bodies: list[bytes], concurrency: int,
                 duration_s: float) -> LevelResult:
    requests = [f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n".encode() + body for body in bodies]
    latencies: list[float] = []
    errors = [0]
    start = time.monotonic()
    end = start + duration_s
    await asyncio.gather(*(_connection(host, port, requests, i, end, latencies, errors) for i in range(concurrency)))
    elapsed = max(time.monotonic() - start, 1e-9)
    latencies.sort()
    return LevelResult(concurrency, len(latencies), errors[0], len(latencies) / elapsed,
                       _percentile(latencies, 0.50) * 1000, _percentile(latencies, 0.99) * 1000)


async def _connection(host: str, port: int, requests: list[bytes], offset: int, end: float, latencies: list[float],
                      errors: list[int]) -> None:
    bodies = itertools.islice(itertools.cycle(requests), offset % len(requests), None)
    stream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
    while time.monotonic() < end:
        try:
            if stream is None:
                stream = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
            reader, writer = stream
            sent = time.monotonic()
            writer.write(next(bodies))
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            status = int(head[9:12])
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
            if status == 200:
                latencies.append(time.monotonic() - sent)
            else:
                errors[0] += 1
            if b"connection: close" in head.lower():
                writer.close()
                stream = None
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError, ValueError):
            errors[0] += 1
            if stream is not None:
                stream[1].close()
            stream = None
            await asyncio.sleep(0.05)  # a server that refuses: do not spin
    if stream is not None:
        stream[1].close()


def _percentile(ordered: list[float], share: float) -> float:
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]
