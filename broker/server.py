"""The broker: one ROUTER for clients, one for workers, one poll loop with a fixed rhythm.

Per tick: handle ready sockets (frontend requests, worker messages, control commands), hand
due batches to workers with a free slot, then, every HOUSEKEEPING_S, reap and restart
children, expire silent peers and overdue requests, and send heartbeats. The poll timeout is
the nearest of the next batch deadline and the next housekeeping, never infinite.

This module only wires the pieces together, each the one owner of its state: InFlight (the
requests held, their replies and the counters), Dispatcher (batches to replicas, results
back), Fleet (model workers), Frontends (the HTTP frontends under gunicorn), LookupStage (I/O batchers), VersionManager (models and
versions), VersionSource (what is on disk) and ControlChannel. None of them holds a
reference to the broker: they take the owner they need or a callable.

Nothing a peer sends ends the loop: every message is decoded by tfbroker/wire/protocol.py, a
malformed one is answered (clients) or dropped (workers) and counted, and a handler that
fails anyway answers its request with 500 and logs the traceback.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import time
from typing import Any

import zmq

from broker import lifecycle as lc
from broker import queries
from broker.config import BatchingParameters, ConfigError, ModelConfig, ServerConfig
from broker.control import ControlChannel
from broker.dispatch import Dispatcher
from broker.fleet import Fleet
from broker.supervisor import Supervisor, become_subreaper
from broker.zygote import Zygote
from broker.frontends import ACCEPT_DRAIN_S, Frontends
from broker.inflight import InFlight
from broker.lookups import LookupStage
from broker.manager import VersionManager
from broker.outbox import Outbox
from broker.models import ServedVersion, version_stats
from broker.source import VersionSource
from broker.stats import process_stats
from broker.traces import BatchSpans
from tfbroker.runtime import tracing
from tfbroker.runtime.process import quiet_gc
from tfbroker.wire import protocol
from tfbroker.wire.errors import Internal, InvalidArgument, ProtocolError, TFBrokerError, Unavailable
from tfbroker.wire.security import KeyRing, load_key_pair, make_server, start_authenticator
from tfbroker.wire.zmqio import NOBLOCK, POLLIN, events, recv_frames, recv_message, send_message

log = logging.getLogger("tfbroker.broker")

HOUSEKEEPING_S = 0.05
RECV_BURST = 512  # messages taken from one socket before the other gets its turn
# Messages ZeroMQ holds per socket before it pushes back: a full receive queue stops
# reading from the peers (their sends fail fast: 503), a full send queue drops replies to a
# client that does not read them. Either way memory stays bounded before admission.
RCVHWM = 20_000
SNDHWM = 100_000
FRAME_OVERHEAD_BYTES = 1 << 16  # a header frame's allowance on top of --max_tensor_bytes


class Broker:
    def __init__(self, config: ServerConfig, models: list[ModelConfig], batching: BatchingParameters,
                 metrics_path: str = "") -> None:
        self.config = config
        self.batching = batching
        self.signals: queue.SimpleQueue[int] = queue.SimpleQueue()
        self.keys = load_key_pair(config.curve_secret_key_file) if config.curve_secret_key_file else None
        self._context = zmq.Context()
        self._authenticator: Any = None
        self._key_ring: KeyRing | None = None
        self.frontend_socket = self._context.socket(zmq.ROUTER)
        self.backend_socket = self._context.socket(zmq.ROUTER)
        self.outbox = Outbox(self._send_frontend)
        try:
            self.tracer = tracing.start("broker")
        except RuntimeError as exc:  # configured, but not installed
            raise ConfigError(str(exc)) from exc
        self.inflight = InFlight(self.outbox.add, batching, enable_batching=config.enable_batching,
                                 max_timeout_ms=config.rest_api_timeout_in_ms,
                                 check_method_names=config.enable_signature_method_name_check)
        self.dispatcher = Dispatcher(self.inflight, self._send_backend, batching,
                                     batches_in_flight=config.batches_in_flight,
                                     spans=BatchSpans(self.tracer, "batch") if self.tracer else None)
        self.supervisor = Supervisor(kill_grace_s=config.kill_grace_s, heartbeat_interval_s=config.heartbeat_interval_s,
                                     heartbeat_expiry_s=config.heartbeat_expiry_s, send=self._send_backend)
        self.zygote = Zygote(config, self.supervisor) if config.worker_start == "zygote" else None
        self.frontends = Frontends(config, self.supervisor, metrics_path=metrics_path)
        self.fleet = Fleet(config, batching, self._send_backend, self._report, self.supervisor, self.zygote)
        self.lookups = LookupStage(config, self.inflight, self._send_backend, self._report, self.supervisor,
                                   spans=BatchSpans(self.tracer, "lookup batch") if self.tracer else None)
        self.versions = VersionManager(config, self.fleet, self.lookups, self.inflight,
                                       VersionSource(config.file_system_poll_wait_seconds),
                                       on_available=lambda: self.frontends.open_when_ready(self.versions.models,
                                                                                           self.fleet.serving))
        self.versions.apply_model_config(models)
        self.control = ControlChannel(config, self.versions, self.stats, self._context,
                                      zygote_status=self.zygote.status if self.zygote else None)
        self._stop_requested_at: float | None = None
        self._frontends_stopped = False
        self._stop_now = False
        self._poller = zmq.Poller()
        self._next_housekeeping = 0.0
        self._last_warning = 0.0

    # --- life cycle ---

    def handle_signal(self, signum: int, frame: Any) -> None:
        self.signals.put(signum)  # only enqueue: the loop acts on it

    def bind(self) -> None:
        if self.keys is not None:
            self._authenticator, self._key_ring = start_authenticator(
                self._context, self.keys, self.config.curve_client_keys_dir)
        for sock in (self.frontend_socket, self.backend_socket, self.control.socket):
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RCVHWM, RCVHWM)
            sock.setsockopt(zmq.SNDHWM, SNDHWM)
            if self.keys is not None:
                make_server(sock, self.keys)
        # A peer that sends a frame larger than any request may hold is disconnected by ZeroMQ
        # before the frame is allocated.
        self.frontend_socket.setsockopt(zmq.MAXMSGSIZE, self.config.limits.max_tensor_bytes + FRAME_OVERHEAD_BYTES)
        # A peer that connects with an identity the socket still holds (a worker reconnecting
        # before its old connection is seen to close) takes it over; by default ZeroMQ drops the
        # newcomer's messages, and such a worker would never be heard again.
        self.backend_socket.setsockopt(zmq.ROUTER_HANDOVER, 1)
        for sock, address in ((self.frontend_socket, self.config.resolved_frontend_address),
                              (self.backend_socket, self.config.resolved_backend_address)):
            sock.bind(address)
            self._poller.register(sock, zmq.POLLIN)
        log.info("frontend socket %s, backend socket %s%s", self.config.resolved_frontend_address,
                 self.config.resolved_backend_address, " (CURVE)" if self.keys else "")
        self.control.bind()
        self._poller.register(self.control.socket, zmq.POLLIN)

    def run_forever(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self.handle_signal)
        now = time.monotonic()
        self._start_zygote(now)
        self.versions.scan(now)
        self.control.start(now)
        self.frontends.bind()
        self.versions.reconcile(now)
        quiet_gc()
        while not self._stop_now:
            events = dict(self._poller.poll(self._poll_timeout_ms()))
            if self.frontend_socket in events:
                self._process_frontend()
            if self.backend_socket in events:
                self._process_backend()
            if self.control.socket in events:
                self.control.process()
            now = time.monotonic()
            self.dispatcher.dispatch(self.fleet.serving, now)
            self.lookups.dispatch(now)
            if now >= self._next_housekeeping:
                self._housekeeping(now)
            self._handle_signals(now)
            self.outbox.flush()
        self._shutdown()

    def close(self) -> None:
        if self.tracer is not None:
            self.tracer.shutdown()
        if self._authenticator is not None:
            self._authenticator.stop()
        self._context.destroy(linger=0)

    def stats(self) -> dict[str, int]:
        counters = self.inflight.counters
        if self._key_ring is not None:
            counters["auth_refused"] = self._key_ring.refused
        return dict(counters)

    # --- clients ---

    def _process_frontend(self) -> None:
        sock = self.frontend_socket
        for _ in range(RECV_BURST):
            # An EVENTS check (1.5 µs) per message rather than the zmq.Again (3.6 µs) a last recv
            # raises: with coalescing clients a burst is one or two messages.
            if not events(sock) & POLLIN:
                return
            frames = recv_message(sock, NOBLOCK)
            client = frames[0]
            self.inflight.counters["client_messages"] += 1
            try:
                members = protocol.decode_all(frames[1:], protocol.CLIENT_TO_BROKER)
            except ProtocolError as exc:
                self._malformed(client, protocol.salvage_id(frames[1:]), exc)
                continue
            now = time.monotonic()
            alike: dict[Any, Any] = {}  # requests of this message resolved and checked (InFlight.admit)
            for message in members:
                if isinstance(message, protocol.Malformed):
                    self._malformed(client, message.id, message.error)
                    continue
                try:
                    self._handle_client(client, message, now, alike)
                except Exception as exc:  # noqa: BLE001 - a bug for one request must not stop the broker
                    self.inflight.counters["failed_handlers"] += 1
                    log.exception("cannot handle a %r message from a client", message.command)
                    self.inflight.reply_error(client, getattr(message.header, "id", None),
                                              Internal(f"broker error: {exc}"))

    def _malformed(self, client: bytes, request_id: int | None, error: ProtocolError) -> None:
        self.inflight.counters["malformed_client"] += 1
        self._warn("malformed message from a client: %s", error)
        self.inflight.reply_error(client, request_id, InvalidArgument(f"protocol error: {error}"))

    def _handle_client(self, client: bytes, message: protocol.Message, now: float, alike: dict[Any, Any]) -> None:
        command, header = message.command, message.header
        if command == protocol.REQUEST:
            self.inflight.admit(client, header, [message.header_frame, *message.frames], self.versions.models,
                                self.lookups.queue_for, now, alike)
        elif command == protocol.CANCEL:
            self.inflight.cancel(client, header.id)
        elif command == protocol.HEARTBEAT:
            self.outbox.add(client, [protocol.HEARTBEAT, protocol.encode_header(protocol.Heartbeat())])
        elif command == protocol.REPOSITORY:
            alike.clear()
            try:
                body = self.control.repository(header)
            except TFBrokerError as exc:
                self.inflight.reply_error(client, header.id, exc)
                return
            self.outbox.add(client, [protocol.REPLY, protocol.encode_header(protocol.ControlReply(id=header.id, body=body))])
        elif command == protocol.RELOAD:
            alike.clear()  # the models may change: what was resolved before no longer holds
            try:
                body = {"changes": self.control.reload_text(header.config)}
            except TFBrokerError as exc:
                self.inflight.reply_error(client, header.id, exc)
                return
            self.outbox.add(client, [protocol.REPLY, protocol.encode_header(protocol.ControlReply(id=header.id, body=body))])
        else:
            try:
                reply = {protocol.METADATA: lambda h: queries.metadata(self.versions.models, h),
                         protocol.STATUS: lambda h: queries.status(self.versions.models, h),
                         protocol.STATS: self._stats,
                         protocol.LOGGING: lambda h: queries.request_logging(
                             self.versions.models, h, self.config.tensorflow.saved_model_tags),
                         protocol.HEALTH: lambda h: queries.health(self.versions.models, h,
                                                                   self._stop_requested_at is not None)}[command](header)
            except TFBrokerError as exc:
                self.inflight.reply_error(client, header.id, exc)
                return
            self.outbox.add(client, [protocol.REPLY, protocol.encode_header(reply)])

    def _stats(self, header: protocol.Query) -> protocol.StatsReply:
        versions = [version_stats(served, self.batching) for model in self.versions.models.values()
                    for served in model.versions.values()]
        pids = {"broker": [os.getpid()], "worker": self.fleet.pids(), "iobatcher": self.lookups.pids(),
                "frontend": self.frontends.pids(),
                "zygote": [self.zygote.child.pid] if self.zygote and self.zygote.child.running and self.zygote.child.pid
                else []}
        status = {**self.control.status(), "history": list(self.versions.history),
                  "iobatchers": self.lookups.status()}
        return protocol.StatsReply(id=header.id, counters=self.stats(), versions=versions,
                                   processes=process_stats(pids), status=status)

    # --- workers ---

    def _process_backend(self) -> None:
        sock = self.backend_socket
        for _ in range(RECV_BURST):
            if not events(sock) & POLLIN:
                return
            frames = recv_frames(sock, NOBLOCK)
            identity = frames[0].bytes
            link = self.fleet.link(identity)
            io_link = self.lookups.link(identity) if link is None else None
            if link is None and io_link is None:
                self._warn("message from unknown worker %r; telling it to stop", identity)
                self._send_backend(identity, protocol.DISCONNECT, protocol.Disconnect(), ())
                continue
            try:
                message = protocol.decode(frames[1:], protocol.WORKER_TO_BROKER)
            except ProtocolError as exc:
                self.inflight.counters["malformed_worker"] += 1
                self._warn("dropping a malformed message from worker %r: %s", identity, exc)
                continue
            try:
                if io_link is not None:
                    io_link.last_heard = time.monotonic()
                    self.lookups.on_message(io_link, message)
                    continue
                assert link is not None
                link.last_heard = time.monotonic()
                header = message.header
                if isinstance(header, (protocol.TaskResult, protocol.JoinedResult)):
                    self.dispatcher.deliver(link, message)
                elif isinstance(header, protocol.Ready):
                    self.fleet.on_ready(link, header)
                elif isinstance(header, protocol.Disconnect):
                    self.fleet.on_disconnect(link, header)
                elif not isinstance(header, protocol.Heartbeat):
                    raise TypeError(f"a model worker does not send {type(header).__name__}")
            except Exception:  # noqa: BLE001 - one worker's bad message must not stop the broker
                self.inflight.counters["failed_handlers"] += 1
                log.exception("cannot handle a %r message from worker %r", message.command, identity)

    def _send_frontend(self, frames: list[Any]) -> None:
        # Not copied: frames from a worker are forwarded as they came (ZeroMQ copies the small ones).
        send_message(self.frontend_socket, frames, copy=False)

    def _send_backend(self, identity: bytes, command: bytes, header: protocol.Header, frames: Any) -> None:
        send_message(self.backend_socket, [identity, *protocol.encode(command, header, frames)], copy=False)

    def _report(self, served: ServedVersion, event: lc.Event, now: float) -> None:
        """An event from the fleet or the lookup stage, for the version's lifecycle."""
        self.versions.handle(served, event, now)

    # --- rhythm ---

    def _poll_timeout_ms(self) -> int:
        now = time.monotonic()
        nearest = min(self._next_housekeeping, self.lookups.next_deadline() or self._next_housekeeping)
        nearest = self.dispatcher.next_deadline(self.fleet.serving, nearest)
        return max(0, int((nearest - now) * 1000 + 0.999))

    def _housekeeping(self, now: float) -> None:
        self._next_housekeeping = now + HOUSEKEEPING_S
        self.supervisor.tick(now)
        if self.zygote is not None:
            self.zygote.manage(now)
        self.fleet.manage(now)
        self.lookups.manage(now)
        self.frontends.open_when_ready(self.versions.models, self.fleet.serving)  # also when a start-up version failed
        if self._stop_requested_at is None:
            self.control.poll_config(now)
            self.versions.poll_disk(now)
            self.versions.reconcile(now)
        self.inflight.expire([t for s in self.fleet.serving for q in s.queues.values() for t in q.expire(now)])
        self.inflight.expire(self.lookups.expire(now))

    def _handle_signals(self, now: float) -> None:
        while not self.signals.empty():
            signum = self.signals.get()
            if signum == signal.SIGHUP:
                self._reload()
            elif self._stop_requested_at is None:
                log.info("received %s: stopping (the frontends finish their requests first)", signal.Signals(signum).name)
                self._stop_requested_at = now
                self.supervisor.stopping = True  # nothing is started again from now on
                self.frontends.refuse_connections()
            else:
                log.info("received %s again; stopping now", signal.Signals(signum).name)
                self._stop_now = True
        if self._stop_requested_at is not None and not self._stop_now:
            if not self._frontends_stopped and now - self._stop_requested_at >= ACCEPT_DRAIN_S:
                self._frontends_stopped = True
                self.frontends.stop()
            # Keep serving while the frontends finish their open requests, within the grace time.
            idle = not self.frontends.running() and not any(s.has_work() for s in self.fleet.serving)
            self._stop_now = idle or now - self._stop_requested_at > self.config.shutdown_grace_s

    def _start_zygote(self, now: float) -> None:
        """The zygote first, so the first workers are forks of it: the broker adopts them as
        their subreaper (no subreaper, no zygote: every worker a fresh interpreter)."""
        if self.zygote is None:
            return
        if not become_subreaper():
            log.warning("--worker_start=zygote needs Linux's child subreaper; workers start as fresh interpreters")
            self.supervisor.forget(self.zygote.child)  # never started: fork() answers False, workers spawn
            return
        self.supervisor.adopting = True
        self.zygote.start(self.zygote.child, now)

    def _reload(self) -> None:
        """SIGHUP, as gunicorn's: re-read the model config, and roll the frontends."""
        log.info("received SIGHUP: reloading the model config and rolling the frontends")
        if self.config.model_config_file:
            try:
                self.control.reload_config()
            except TFBrokerError as exc:
                log.error("%s", exc.message)
        self.frontends.roll()

    def stop_children(self) -> None:
        """The frontends, then every version unloads after the batches in hand, then the
        workers and I/O batchers go."""
        self.supervisor.stopping = True
        self.frontends.stop_now()
        if self.zygote is not None:
            self.zygote.stop()  # no more forks; the workers it forked are the broker's
        self.versions.stop_all(time.monotonic())
        self.fleet.stop_workers()
        self.lookups.stop()

    def _shutdown(self) -> None:
        serving = list(self.fleet.serving)
        self.stop_children()
        for served in serving:
            self.inflight.fail_version(served, Unavailable("the server is shutting down"))
        self.outbox.flush()
        log.debug("stopped")

    def _warn(self, text: str, *args: Any) -> None:
        """A warning at most once a second: a peer that floods the broker must not flood the log."""
        now = time.monotonic()
        if now - self._last_warning >= 1.0:
            self._last_warning = now
            log.warning(text, *args)
