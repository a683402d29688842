"""The I/O batcher: holds the lookup tables of the versions the broker names, answers lookup
batches. Never imports TensorFlow.

The backend loop the worker uses too (tfbroker/runtime/backend_peer.py): receive a message,
act, send heartbeats when quiet; when the broker goes quiet it exits (the broker restarts
its I/O batchers: a fresh one is cheaper than a reconnect). Tables load
in a thread beside it (a vocabulary or key file of millions of lines takes seconds to read,
longer than the broker waits for a heartbeat); LOADED goes out from the loop when a load
ends, and batches for a version are only sent once it has. A LookupBatch
is looked up table by table over the whole batch: the keys of every task together, each
distinct key once (one vectorised step, or one Redis MGET), then cut back per task. A task
whose keys are missing under ``on_missing: error`` fails alone (400); a table that cannot be
reached fails the tasks that use it (503).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from iobatcher.tables import Table, TableError, load_tables
from tfbroker.runtime.backend_peer import BackendPeer
from tfbroker.runtime import tracing
from tfbroker.runtime.process import EXIT_OK, die_with_parent, enable_fault_dumps, set_title, setup_logging
from tfbroker.runtime.settings import IoBatcherConfig
from tfbroker.wire import fields, protocol, tensors
from tfbroker.wire.errors import DeadlineExceeded, InvalidArgument, ProtocolError, TFBrokerError, Unavailable

log = logging.getLogger("tfbroker.iobatcher")

LOAD_CHECK_S = 0.02  # how often the loop looks at loads in progress


def run(config: IoBatcherConfig) -> int:
    set_title("iobatcher")
    setup_logging(config.log_level, f"iobatcher:{config.index}")
    die_with_parent()
    batcher = IoBatcher(config)
    signal.signal(signal.SIGTERM, batcher.handle_signal)
    signal.signal(signal.SIGINT, batcher.handle_signal)
    enable_fault_dumps()
    return batcher.serve()


class IoBatcher:
    def __init__(self, config: IoBatcherConfig) -> None:
        self.config = config
        self.tables: dict[tuple[str, int], list[Table]] = {}
        self._loading: dict[tuple[str, int], tuple[Future[list[Table]], float]] = {}
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="tables")
        self._peer = BackendPeer(config, f"iobatcher:{config.index}:{os.getpid()}".encode())
        self._send = self._peer.send
        self._tracer = tracing.start_in_child(f"iobatcher:{config.index}")

    def handle_signal(self, signum: int, frame: Any) -> None:
        self._peer.stopping = signal.Signals(signum).name

    def serve(self) -> int:
        self._peer.connect()
        self._send(protocol.READY, protocol.IoReady(pid=os.getpid()))
        try:
            self._peer.serve(self._handle, tick=self._finish_loads,
                             wait_s=lambda: LOAD_CHECK_S if self._loading else self.config.heartbeat_interval_s)
        finally:
            self._loader.shutdown(wait=True, cancel_futures=True)
            for key in list(self._loading):
                self._drop(key)
            for key in list(self.tables):
                self._drop(key)
            self._peer.close(linger_ms=1000)
            self._peer.term()
            if self._tracer is not None:
                self._tracer.shutdown()
        return EXIT_OK

    # --- implementation ---

    def _handle(self, frames: list[Any]) -> bool:
        try:
            message = protocol.decode(frames, protocol.BROKER_TO_IOBATCHER)
        except ProtocolError as exc:
            log.error("dropping a malformed message from the broker: %s", exc)
            return True
        header = message.header
        if isinstance(header, protocol.LookupBatch):
            received = time.monotonic()
            try:
                self._run_batch(header, message.frames, received)
            except Exception as exc:  # noqa: BLE001 - last resort: the batch fails, the batcher goes on
                log.exception("lookup batch %d failed unexpectedly", header.batch)
                failures = [protocol.LookupFailure(i, 500, f"I/O batcher error: {type(exc).__name__}: {exc}")
                            for i in range(len(header.counts))]
                self._send(protocol.RESULT, protocol.LookupResult(batch=header.batch, counts=[0] * len(header.counts),
                                                                  outputs=[], failures=failures))
            if self._tracer is not None:
                for parent in header.traces:  # the lookups' span in each traced request's trace
                    self._tracer.span("tfbroker lookups", parent, received, self._peer.last_send_s, attributes={
                        "model.name": header.model, "model.version": header.version,
                        "tfbroker.lookup_batch": header.batch, "tfbroker.batch_tasks": len(header.counts)})
        elif isinstance(header, protocol.Tables) and message.command == protocol.LOAD:
            self._load(header)
        elif isinstance(header, protocol.Tables):
            self._drop((header.model, header.version))
            log.info("unloaded the tables of model %s version %d", header.model, header.version)
        elif isinstance(header, protocol.Disconnect):
            return False  # the broker asked this process to stop (BackendPeer logs it)
        return True

    def _load(self, header: protocol.Tables) -> None:
        key = (header.model, header.version)
        if key in self.tables:  # already held (a LOAD sent again after a restart of the broker's view)
            self._send_loaded(key, self.tables[key])
        elif key not in self._loading:
            future = self._loader.submit(load_tables, header.path, self.config.redis_timeout_ms)
            self._loading[key] = (future, time.monotonic())

    def _finish_loads(self) -> None:
        for key, (future, started) in list(self._loading.items()):
            if not future.done():
                continue
            del self._loading[key]
            try:
                tables = future.result()
            except Exception as exc:  # noqa: BLE001 - TableError names the problem; anything else fails the load too
                if not isinstance(exc, TableError):
                    log.exception("loading the tables of model %s version %d failed", key[0], key[1])
                log.error("model %s version %d: %s", key[0], key[1], exc)
                self._send(protocol.LOADED, protocol.TablesLoaded(model=key[0], version=key[1], lookups=[],
                                                                  error=str(exc)[:fields.MAX_MESSAGE_CHARS]))
                continue
            self.tables[key] = tables
            log.info("loaded %d lookup tables of model %s version %d in %.2f s", len(tables), key[0], key[1],
                     time.monotonic() - started)
            self._send_loaded(key, tables)

    def _send_loaded(self, key: tuple[str, int], tables: list[Table]) -> None:
        self._send(protocol.LOADED, protocol.TablesLoaded(model=key[0], version=key[1],
                                                          lookups=[t.spec for t in tables]))

    def _drop(self, key: tuple[str, int]) -> None:
        """Forget a version's tables, or the load in progress (its tables are closed when it ends)."""
        loading = self._loading.pop(key, None)
        if loading is not None:
            loading[0].add_done_callback(_close_loaded)
        for table in self.tables.pop(key, []):
            table.close()

    def _run_batch(self, header: protocol.LookupBatch, frames: list[Any], received: float) -> None:
        count = len(header.counts)
        errors: dict[int, TFBrokerError] = {}
        tables = self.tables.get((header.model, header.version))
        inputs: list[dict[str, np.ndarray]] = []
        offset = 0
        for i, (n, timeout_ms) in enumerate(zip(header.counts, header.timeouts_ms)):
            specs, task_frames = header.inputs[offset:offset + n], frames[offset:offset + n]
            offset += n
            inputs.append({})
            if tables is None:
                errors[i] = Unavailable(f"this I/O batcher holds no tables of model {header.model} version "
                                        f"{header.version}")
            elif time.monotonic() > received + timeout_ms / 1000:
                errors[i] = DeadlineExceeded()
            else:
                try:
                    inputs[i] = tensors.decode_tensors(specs, task_frames)
                except ProtocolError as exc:
                    errors[i] = InvalidArgument(f"protocol error: {exc}")
        outputs: list[dict[str, np.ndarray]] = [{} for _ in range(count)]
        keys = unique = 0
        for table in tables or ():
            done = _lookup(table, inputs, errors, outputs)
            keys += done[0]
            unique += done[1]
        counts, specs, out_frames, failures = [], [], [], []
        for i in range(count):
            if i in errors:
                counts.append(0)
                failures.append(protocol.LookupFailure(i, errors[i].http_status, errors[i].message))
                continue
            task_specs, task_frames = tensors.encode_tensors(outputs[i])
            counts.append(len(task_specs))
            specs.extend(task_specs)
            out_frames.extend(task_frames)
        self._send(protocol.RESULT, protocol.LookupResult(batch=header.batch, counts=counts, outputs=specs,
                                                          failures=failures, keys=keys, unique_keys=unique), out_frames)


def _lookup(table: Table, inputs: list[dict[str, np.ndarray]], errors: dict[int, TFBrokerError],
            outputs: list[dict[str, np.ndarray]]) -> tuple[int, int]:
    """One table over the whole batch: every task's keys together, each distinct key once.
    Fills ``outputs``, or ``errors`` for the tasks that fail; (keys, distinct keys)."""
    spec = table.spec
    users = [i for i, given in enumerate(inputs) if spec.input in given and i not in errors]
    arrays = []
    for i in users[:]:
        array = inputs[i][spec.input]
        if (array.dtype == object) != (spec.input_dtype == protocol.STRING) or array.dtype.kind == "f":
            errors[i] = InvalidArgument(f"input '{spec.input}' must be {spec.input_dtype}, got {array.dtype}")
            users.remove(i)
            continue
        arrays.append(array)
    if not users:
        return 0, 0
    flat = np.concatenate([a.reshape(-1) for a in arrays])
    distinct, inverse = _distinct(flat)
    try:
        values, missing = table.lookup(distinct)
    except TFBrokerError as exc:
        for i in users:
            errors[i] = exc
        return len(flat), len(distinct)
    start = 0
    for i, array in zip(users, arrays):
        picks = inverse[start:start + array.size]
        start += array.size
        if table.on_missing == "error" and missing[picks].any():
            key = distinct[picks[missing[picks]][0]]
            shown = key.decode(errors="replace") if isinstance(key, bytes) else int(key)
            errors[i] = InvalidArgument(f"input '{spec.input}': key {shown!r} is not in the lookup table")
            continue
        outputs[i][spec.output] = values[picks].reshape(array.shape + values.shape[1:])
    return len(flat), len(distinct)


def _close_loaded(future: Future[list[Table]]) -> None:
    if not future.cancelled() and future.exception() is None:
        for table in future.result():
            table.close()


def _distinct(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct keys and, for each key, its index among them."""
    if flat.dtype != object:
        return np.unique(flat, return_inverse=True)  # type: ignore[return-value]
    index: dict[bytes, int] = {}
    inverse = np.fromiter((index.setdefault(k, len(index)) for k in flat), dtype=np.int64, count=len(flat))
    distinct = np.empty(len(index), dtype=object)
    distinct[:] = list(index)
    return distinct, inverse
