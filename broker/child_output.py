"""What model workers write to their fd 2 after start-up (TensorFlow's C++ output), read by
the broker from one pipe per worker and logged in the one log format, with the worker's role
and pid (tfbroker/runtime/logs.py: log_child_lines).

Read by the parent, not by a thread in the worker, so that the line a worker writes as it
aborts (a failed CHECK) is kept: it stays in the pipe after the worker is gone.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from tfbroker.runtime.logs import log_child_lines

MOST_PER_READ = 1 << 16


@dataclass(slots=True)
class _Pipe:
    fd: int
    role: str
    pid: int
    partial: bytes = b""


class OutputRelay:
    """The read ends of the workers' pipes, read at each housekeeping tick (never blocking)."""

    def __init__(self, *, cpu_only: bool) -> None:
        self._cpu_only = cpu_only
        self._pipes: dict[int, _Pipe] = {}  # by pid

    @staticmethod
    def pipe() -> tuple[int, int]:
        """A new pipe: the read end for ``watch``, the write end for the child (closed here
        once it is spawned)."""
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        return read_fd, write_fd

    def watch(self, read_fd: int, role: str, pid: int) -> None:
        self._pipes[pid] = _Pipe(read_fd, role, pid)

    def poll(self) -> None:
        for pid in list(self._pipes):
            self.drain(pid)

    def drain(self, pid: int) -> None:
        """Log what the process has written; at end of file (it has exited) forget its pipe."""
        pipe = self._pipes.get(pid)
        if pipe is None:
            return
        while True:
            try:
                data = os.read(pipe.fd, MOST_PER_READ)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._log(pipe, pipe.partial, final=True)
                os.close(pipe.fd)
                del self._pipes[pid]
                return
            pipe.partial = self._log(pipe, pipe.partial + data)

    def close(self) -> None:
        for pid in list(self._pipes):
            self.drain(pid)
        for pipe in self._pipes.values():
            os.close(pipe.fd)
        self._pipes.clear()

    def _log(self, pipe: _Pipe, data: bytes, *, final: bool = False) -> bytes:
        """Logs the complete lines of ``data``; returns the unfinished rest."""
        lines = data.split(b"\n")
        rest = b"" if final else lines.pop()
        log_child_lines(lines, pipe.role, pipe.pid, cpu_only=self._cpu_only)
        return rest
