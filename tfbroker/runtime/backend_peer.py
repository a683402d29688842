"""A child's side of the broker's backend socket: the one loop model workers and I/O
batchers share, as mosec separates its coordinator from the user's worker.

A DEALER with the child's identity (CURVE when the environment holds keys), one poll loop
that hands each message to the role's handler, heartbeats from that same loop (so a hung
handler looks like a dead peer to the broker), and what to do when the broker goes quiet:
reconnect with exponential back-off and say hello again (a model worker: its model stays
loaded), or stop (an I/O batcher, which the broker restarts).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import zmq

from tfbroker.runtime.process import parent_alive
from tfbroker.runtime.settings import ChildConfig
from tfbroker.wire import protocol
from tfbroker.wire.security import client_keys_from_env, make_client
from tfbroker.wire.zmqio import send_message

log = logging.getLogger("tfbroker.peer")

MAX_BACKOFF_S = 30.0

# The role's handler of one message from the broker: False to stop.
Handler = Callable[[list[Any]], bool]


class BackendPeer:
    def __init__(self, config: ChildConfig, identity: bytes) -> None:
        self.address = config.backend_address
        self.identity = identity
        self.interval_s = config.heartbeat_interval_s
        self.expiry_s = config.heartbeat_interval_s * config.heartbeat_liveness
        # Set by the role's signal handler (the signal's name); the loop ends at its next turn.
        self.stopping: str | bool = False
        self._context: zmq.Context | None = None  # made by connect(), in the process that serves
        self._curve = client_keys_from_env()
        self._socket: zmq.Socket | None = None
        # When the last message began to leave: the heartbeat's clock, and where a traced
        # stage ends, so that its span ends before the parent's, ended when the broker receives.
        self.last_send_s = self._last_heard = 0.0

    def connect(self) -> None:
        if self._context is None:
            self._context = zmq.Context()
        sock = self._context.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, self.identity)
        sock.setsockopt(zmq.LINGER, 0)
        if self._curve is not None:
            make_client(sock, *self._curve)
        sock.connect(self.address)
        self._socket = sock
        self._last_heard = time.monotonic()

    def send(self, command: bytes, header: protocol.Header, frames: Any = ()) -> None:
        if self._socket is None:
            raise RuntimeError("not connected to the broker")
        self.last_send_s = time.monotonic()
        send_message(self._socket, protocol.encode(command, header, frames), copy=False)

    def serve(self, handle: Handler, *, hello: Callable[[], None] | None = None,
              tick: Callable[[], None] | None = None, wait_s: Callable[[], float] | None = None) -> None:
        """Until a handler says stop (the broker's DISCONNECT), a signal, the broker's silence
        with no ``hello`` (to reconnect with), or the broker's death; then one line says why.
        ``tick`` runs after every turn; ``wait_s`` bounds each poll (the heartbeat interval by
        default)."""
        why = self._serve(handle, hello, tick, wait_s)
        if why:
            log.info("stopping: %s", why)

    def _serve(self, handle: Handler, hello: Callable[[], None] | None, tick: Callable[[], None] | None,
               wait_s: Callable[[], float] | None) -> str:
        backoff_s = self.interval_s
        while True:
            if self.stopping:
                return f"received {self.stopping}" if isinstance(self.stopping, str) else "asked to stop"
            if not parent_alive():
                return "the broker is gone"
            if self._socket is None:
                raise RuntimeError("not connected to the broker")
            if self._socket.poll(int((wait_s() if wait_s else self.interval_s) * 1000)):
                frames = self._socket.recv_multipart(copy=False)
                self._last_heard = time.monotonic()
                backoff_s = self.interval_s
                if not handle(frames):
                    return "the broker asked it to"
            if tick is not None:
                tick()
            now = time.monotonic()
            if now - self.last_send_s >= self.interval_s:
                self.send(protocol.HEARTBEAT, protocol.Heartbeat())
            if now - self._last_heard > self.expiry_s:
                if hello is None:
                    log.warning("no word from the broker for %.1f s; exiting", now - self._last_heard)
                    return ""
                log.warning("no word from the broker for %.1f s; reconnecting", now - self._last_heard)
                self.close(linger_ms=0)
                time.sleep(min(backoff_s, MAX_BACKOFF_S))
                backoff_s *= 2
                self.connect()
                hello()

    def close(self, *, linger_ms: int) -> None:
        if self._socket is not None:
            self._socket.close(linger=linger_ms)
            self._socket = None

    def term(self) -> None:
        self.close(linger_ms=0)
        if self._context is not None:
            self._context.term()
            self._context = None
