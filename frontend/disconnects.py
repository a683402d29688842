"""Predictions whose HTTP client went away are cancelled, so the broker drops them unrun.

A prediction still waiting on the broker after ``after_s`` starts watching its connection
(a ``receive()`` that returns ``http.disconnect`` when the client closes it) and its task is
cancelled when that comes. Most predictions are answered sooner: for them this is a dict
entry made and removed. One timer per frontend sweeps the waiting ones, rather than a timer
per request (2 µs a request with uvloop, the largest item of the frontend's own glue).
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any, Awaitable, Callable

Receive = Callable[[], Awaitable[Any]]


class DisconnectWatch:
    def __init__(self, after_s: float) -> None:
        self.after_s = after_s
        # In arrival order, so the first is the oldest: (since, receive) by task.
        self._waiting: dict[asyncio.Task[Any], tuple[float, Receive]] = {}
        self._watchers: dict[asyncio.Task[Any], asyncio.Future[Any]] = {}
        self._gone: set[asyncio.Task[Any]] = set()
        self._timer: asyncio.TimerHandle | None = None

    def add(self, task: asyncio.Task[Any], receive: Receive, loop: asyncio.AbstractEventLoop) -> None:
        self._waiting[task] = (loop.time(), receive)
        if self._timer is None:
            self._timer = loop.call_later(self.after_s, self._sweep, loop)

    def done(self, task: asyncio.Task[Any]) -> bool:
        """Stop watching ``task``; whether its client went away."""
        if self._waiting.pop(task, None) is None:
            watcher = self._watchers.pop(task, None)
            if watcher is not None:
                watcher.cancel()
            if task in self._gone:
                self._gone.discard(task)
                return True
        return False

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        due = loop.time() - self.after_s
        for task, (since, receive) in list(self._waiting.items()):
            if since > due:
                self._timer = loop.call_at(since + self.after_s, self._sweep, loop)
                return
            del self._waiting[task]
            watcher = asyncio.ensure_future(receive())
            watcher.add_done_callback(functools.partial(self._on_receive, task))
            self._watchers[task] = watcher

    def _on_receive(self, task: asyncio.Task[Any], watcher: asyncio.Future[Any]) -> None:
        if watcher.cancelled() or watcher.exception() is not None or task not in self._watchers:
            return
        if watcher.result().get("type") == "http.disconnect":
            self._gone.add(task)
            task.cancel()
