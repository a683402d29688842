"""The lookup stage: a version that declares lookups (``assets.extra/lookups.json``) has its
requests go through an I/O batcher before its model.

A request is pinned to its version at admission. If its signature takes a looked-up tensor,
it waits in the version's lookup queue (``--lookup_*`` batching, one queue per version), is
sent in a LookupBatch to an I/O batcher that holds that version's tables, and comes back as
the model's own inputs (the request's other inputs pass through untouched), which go to
the same version's model queue. A version's tables load with it (LOAD to every I/O batcher,
TablesLoaded to its lifecycle once all have answered) and unload when it ends, after its
last request has left every stage.

This module is the stage's queues and the requests in them; its processes, the I/O batchers
(``tfbroker: iobatcher``), are broker/iobatchers.py's, started when the first version with
lookups loads. One that dies or goes silent fails its lookups in flight with 503 here and is
restarted, and loads again the tables of every live version.
"""

from __future__ import annotations

import itertools
import logging
import time
from typing import Any, Callable, Sequence

from broker import lifecycle as lc
from tfbroker.wire import protocol
from broker.batching import BatchQueue, Task
from broker.config import ServerConfig
from broker.inflight import InFlight, Pending
from broker.lookup_codec import build_lookup_batch, model_request
from tfbroker.wire.errors import Internal, TFBrokerError, Unavailable, from_code
from broker.models import ServedVersion, check_inputs
from broker.signatures import describe_for_clients
from broker.iobatchers import IoBatchers, IoLink
from broker.links import SendToChild
from broker.supervisor import Supervisor
from broker.traces import NO_SPANS, BatchSpans
from broker.versions import VersionState

log = logging.getLogger("tfbroker.lookups")

# What the stage reports to a version's lifecycle (the version manager's handle).
Report = Callable[[ServedVersion, lc.Event, float], None]


class LookupStage:
    def __init__(self, config: ServerConfig, inflight: InFlight, send: SendToChild, report: Report,
                 supervisor: Supervisor, spans: BatchSpans | None = None) -> None:
        self.config = config
        self._spans = spans  # when tracing
        self._inflight = inflight
        self._send_to = send
        self._report = report
        self.params = self.config.lookup_batching.parameters()
        self.processes = IoBatchers(config, send, supervisor, on_lost=self._lost)
        self._links = self.processes.links  # the I/O batchers' links: their tables and lookups in flight
        self._versions: list[ServedVersion] = []  # versions whose tables are (being) loaded
        self._batch_ids = itertools.count(1)

    # --- what a version's lifecycle asks for ---

    def load_tables(self, served: ServedVersion) -> None:
        if not self._links:
            self.processes.start_all()
        self._versions.append(served)
        for link in self._links:
            if link.ready:
                self._send(link, protocol.LOAD, protocol.Tables(model=served.model, version=served.version,
                                                                path=served.path))

    def unload_tables(self, served: ServedVersion) -> None:
        if served in self._versions:
            self._versions.remove(served)
        key = (served.model, served.version)
        for link in self._links:
            if key in link.loaded and link.ready:
                self._send(link, protocol.UNLOAD, protocol.Tables(model=served.model, version=served.version))
            link.loaded.discard(key)

    # --- requests ---

    def queue_for(self, served: ServedVersion, signature: str) -> BatchQueue | None:
        """The version's lookup queue when ``signature`` takes a looked-up tensor, else None.
        Unavailable when no I/O batcher holds the version's tables."""
        if not served.lookups:
            return None
        inputs = served.model_signatures.get(signature)
        if inputs is None or not any(lk.output in inputs.inputs for lk in served.lookups):
            return None
        key = (served.model, served.version)
        if not any(link.ready and key in link.loaded for link in self._links):
            raise Unavailable(f"no I/O batcher holds the lookup tables of model {served.model} version "
                              f"{served.version} right now (restarting)")
        if served.lookup_queue is None:
            served.lookup_queue = BatchQueue(self.params, batching=self.config.enable_batching)
        return served.lookup_queue

    def dispatch(self, now: float) -> None:
        """Hand due lookup batches to I/O batchers with a free slot that hold their tables."""
        for served in self._versions:
            queue_ = served.lookup_queue
            if queue_ is None or not len(queue_):
                continue
            key = (served.model, served.version)
            for link in sorted(self._links, key=lambda lk: len(lk.in_flight)):  # least loaded first
                if not link.ready or key not in link.loaded:
                    continue
                while len(link.in_flight) < self.config.batches_in_flight:
                    batch = queue_.next_batch(now, idle=not link.in_flight)
                    if batch is None:
                        break
                    self._send_batch(link, served, batch.tasks, now)

    def next_deadline(self) -> float | None:
        deadlines = [d for s in self._versions if s.lookup_queue is not None
                     for d in (s.lookup_queue.next_deadline(),) if d is not None]
        return min(deadlines, default=None)

    def expire(self, now: float) -> list[Task]:
        return [t for s in self._versions if s.lookup_queue is not None for t in s.lookup_queue.expire(now)]

    # --- messages from I/O batchers ---

    def on_message(self, link: IoLink, message: protocol.Message) -> None:
        header = message.header
        if isinstance(header, protocol.IoReady):
            self._on_ready(link)
        elif isinstance(header, protocol.TablesLoaded):
            self._on_loaded(link, header)
        elif isinstance(header, protocol.LookupResult):
            self._deliver(link, header, message.frames)
        elif isinstance(header, protocol.Disconnect) and header.error:
            log.error("I/O batcher %d: %s", link.index, header.error)
        elif not isinstance(header, (protocol.Heartbeat, protocol.Disconnect)):
            raise TypeError(f"an I/O batcher does not send {type(header).__name__}")

    # --- the housekeeping tick ---

    def manage(self, now: float) -> None:
        self._check_loads()

    def link(self, identity: bytes) -> IoLink | None:
        return self.processes.link(identity)

    def status(self) -> list[dict[str, Any]]:
        return self.processes.status()

    def pids(self) -> list[int]:
        return self.processes.pids()

    def stop(self) -> None:
        self.processes.stop()

    # --- implementation ---

    def _on_ready(self, link: IoLink) -> None:
        link.ready = True
        for served in self._versions:
            self._send(link, protocol.LOAD, protocol.Tables(model=served.model, version=served.version,
                                                            path=served.path))

    def _on_loaded(self, link: IoLink, header: protocol.TablesLoaded) -> None:
        served = next((s for s in self._versions if (s.model, s.version) == (header.model, header.version)), None)
        if served is None:
            return  # unloaded meanwhile
        if header.error:
            log.error("model %s version %d: %s", served.model, served.version, header.error)
            self._report(served, lc.TablesFailed(header.error), time.monotonic())
            return
        link.loaded.add((served.model, served.version))
        served.lookups = list(header.lookups)
        if served.model_signatures:
            describe_for_clients(served)
        self._check_loads()

    def _check_loads(self) -> None:
        """A version's tables are loaded once every I/O batcher that is up holds them."""
        now = time.monotonic()
        for served in list(self._versions):
            key = (served.model, served.version)
            ready = [link for link in self._links if link.ready]
            if (served.state is VersionState.LOADING and not served.life.tables_ready and ready
                    and all(key in link.loaded for link in ready)):
                self._report(served, lc.TablesReady(), now)

    def _send_batch(self, link: IoLink, served: ServedVersion, tasks: list[Task], now: float) -> None:
        live = self._inflight.take_live(tasks, now)
        if not live:
            return
        batch_id = next(self._batch_ids)
        header, frames = build_lookup_batch(batch_id, served, live, now)
        spans: Sequence[Any] = NO_SPANS
        if self._spans is not None:
            header.traces, spans = self._spans.open(live, now, {  # type: ignore[attr-defined]
                "model.name": served.model, "model.version": served.version, "tfbroker.lookup_batch": batch_id,
                "tfbroker.batch_tasks": len(live)})
        self._send(link, protocol.BATCH, header, frames)
        link.in_flight[batch_id] = (served, live, spans)
        served.lookups_in_flight += len(live)
        counters = self._inflight.counters
        counters["lookup_batches"] += 1
        counters["lookup_tasks"] += len(live)

    def _deliver(self, link: IoLink, result: protocol.LookupResult, frames: list[Any]) -> None:
        entry = link.in_flight.pop(result.batch, None)
        if entry is None:
            return
        served, tasks, spans = entry
        served.lookups_in_flight -= len(tasks)
        if spans and self._spans is not None:
            self._spans.close(spans, time.monotonic(), attributes={"tfbroker.lookup_keys": result.keys})
        counters = self._inflight.counters
        if len(result.counts) != len(tasks):
            counters["malformed_worker"] += 1
            self._inflight.fail(tasks, Internal("the I/O batcher returned a malformed result"))
            return
        counters["lookup_keys"] += result.keys
        counters["lookup_unique_keys"] += result.unique_keys
        failures = {f.task: f for f in result.failures}
        now = time.monotonic()
        offset = 0
        for i, (task, count) in enumerate(zip(tasks, result.counts)):
            outputs, looked_up = result.outputs[offset:offset + count], frames[offset:offset + count]
            offset += count
            failure = failures.get(i)
            if failure is not None:
                counters["lookup_failed"] += 1
                self._inflight.reply_error(task.payload.client, task.payload.request_id,
                                        from_code(failure.code, failure.message))
                continue
            self._to_model(served, task, outputs, looked_up, now)

    def _to_model(self, served: ServedVersion, task: Task, outputs: list[protocol.TensorSpec],
                  looked_up: list[Any], now: float) -> None:
        """The request, its lookups done, goes to its version's model queue."""
        pending: Pending = task.payload
        request, frames = model_request(served, pending, outputs, looked_up)
        try:
            rows, join_key = check_inputs(served, request.signature, request.inputs, frames[1:], model_side=True)
            follow = Task(rows, task.deadline, Pending(pending.client, pending.request_id, frames, join_key,
                                                       pending.admitted, trace=pending.trace))
            self._inflight.enqueue(served, request.signature, follow, now)
        except TFBrokerError as exc:
            self._inflight.reply_error(pending.client, pending.request_id, exc)

    def _lost(self, link: IoLink, why: str) -> None:
        """The I/O batcher is gone: its lookups in flight get 503 at once."""
        for served, tasks, spans in link.in_flight.values():
            served.lookups_in_flight -= len(tasks)
            if spans and self._spans is not None:
                self._spans.close(spans, time.monotonic(), error=why)
            self._inflight.fail(tasks, Unavailable(f"{why}; lookups of model {served.model} are retried "
                                                      "by the next request"))
        link.in_flight.clear()

    def _send(self, link: IoLink, command: bytes, header: protocol.Header, frames: Any = ()) -> None:
        self.processes.send(link, command, header, frames)
        link.last_sent = time.monotonic()

