"""The model worker: owns the device, loads one SavedModel version, runs whole batches.

Order of start-up (style.md 7): process title, logging, signals, ZeroMQ, then TensorFlow.
Heartbeats go out from the same loop that runs the model, so a hung model call looks like
a dead worker to the broker.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import Any, Callable

from tfbroker.runtime import tracing
from tfbroker.runtime.backend_peer import BackendPeer
from tfbroker.runtime.devices import visible_gpus
from tfbroker.runtime.logs import relay_output_to_broker, tensorflow_output
from tfbroker.runtime.process import (EXIT_MODEL_LOAD_ERROR, EXIT_OK, die_with_parent, enable_fault_dumps, set_title,
                                      setup_logging)
from tfbroker.runtime.settings import WorkerConfig
from tfbroker.wire import protocol, tensors
from tfbroker.wire.errors import DeadlineExceeded, Internal, InvalidArgument, NotFound, ProtocolError, TFBrokerError

log = logging.getLogger("tfbroker.worker")


def run(config: WorkerConfig) -> int:
    set_title(config.title)
    setup_logging(config.log_level, config.title)
    die_with_parent()
    worker = ModelWorker(config)
    signal.signal(signal.SIGTERM, worker.handle_signal)
    signal.signal(signal.SIGINT, worker.handle_signal)
    # Where the worker is when it crashes, or when the broker asks before stopping it for
    # missing heartbeats (stuck in a model call, where no Python signal handler can run).
    enable_fault_dumps()
    return worker.serve()


class ModelWorker:
    """The model's side of the backend loop (tfbroker/runtime/backend_peer.py): load, warm up,
    READY, then one batch at a time."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self._peer = BackendPeer(config, f"{config.model_name}:{config.version}:{os.getpid()}".encode())
        self._send = self._peer.send
        self._model: Any = None
        self._tracer = tracing.start_in_child(f"worker:{config.model_name}:{config.version}")

    def handle_signal(self, signum: int, frame: Any) -> None:
        self._peer.stopping = signal.Signals(signum).name

    def serve(self) -> int:
        self._peer.connect()
        try:
            # TensorFlow comes last; its start-up notes are kept out of the log (tfbroker/runtime/logs.py).
            with tensorflow_output(cpu_only=not visible_gpus()):
                from workers import model as model_lib
                from workers import tflite_model, warmup

                options = self.config.tensorflow
                model_lib.configure_devices(options.intra_op_threads, options.inter_op_threads,
                                            gpu_memory_fraction=options.per_process_gpu_memory_fraction,
                                            mixed_precision=options.mixed_precision)
                started = time.monotonic()
                if options.prefer_tflite_model and model_lib.has_tflite_model(self.config.path):
                    self._model = tflite_model.load_tflite(self.config.path, model_lib.intra_op_threads())
                else:
                    self._model = model_lib.load(self.config.path, tuple(options.saved_model_tags.split(",")))
                records = (warmup.warm_up_from_file(self._model, options.num_request_iterations_for_warmup)
                           if options.enable_model_warmup else 0)
                warmup.warm_up_batch_sizes(self._model, self.config.warmup_batch_sizes)
            log.info("loaded %s (%s loader, signatures %s, %d warm-up records) in %.1f s on %s "
                     "(CUDA_VISIBLE_DEVICES=%r)", self.config.path, self._model.loader, sorted(self._model.signatures),
                     records, time.monotonic() - started, self.config.device or "the default device",
                     os.environ.get("CUDA_VISIBLE_DEVICES"))
        except Exception as exc:  # noqa: BLE001 - any failure to load is reported the same way
            log.error("cannot load model %s version %d: %s", self.config.model_name, self.config.version, exc)
            self._send(protocol.DISCONNECT, protocol.Disconnect(error=str(exc)[:2000]))
            self._peer.close(linger_ms=2000)
            self._peer.term()  # sends what is queued first: a fork ends in os._exit, with no teardown to do it
            return EXIT_MODEL_LOAD_ERROR
        relay_output_to_broker()  # what TensorFlow says from now on goes through the log format
        self._send_ready()
        try:
            # After a reconnect the model is still loaded: READY again is all the broker needs.
            self._peer.serve(self._handle, hello=self._send_ready)
        finally:
            self._peer.close(linger_ms=1000)
            self._peer.term()
            if self._tracer is not None:
                self._tracer.shutdown()
        return EXIT_OK

    # --- implementation ---

    def _handle(self, frames: list[Any]) -> bool:
        """Act on one message; False to stop."""
        try:
            message = protocol.decode(frames, protocol.BROKER_TO_WORKER)
        except ProtocolError as exc:
            log.error("dropping a malformed message from the broker: %s", exc)
            return True
        if isinstance(message.header, protocol.LookupBatch):
            log.error("dropping a lookup batch: this is a model worker")
        elif message.command == protocol.BATCH:
            received = time.monotonic()
            try:
                self._run_batch(message, received)
            except Exception as exc:  # noqa: BLE001 - last resort: the batch fails, the worker goes on
                log.exception("batch %d failed unexpectedly", message.header.batch)
                ids = message.header.ids if isinstance(message.header, protocol.JoinedBatch) else None
                self._fail_batch(message, ids, Internal(f"model worker error: {type(exc).__name__}: {exc}"))
            if self._tracer is not None and message.header.traces:
                self._trace_batch(message.header, received)
        elif message.command == protocol.DISCONNECT:
            return False  # the broker asked this process to stop (BackendPeer logs it)
        return True

    def _run_batch(self, message: protocol.Message, received: float) -> None:
        # Imported here, not at the top: workers.batch imports TensorFlow, which comes last.
        from workers.batch import decode_batch, run_batch, run_joined, run_joined_outcomes, split_expired

        header = message.header
        deadlines = [received + ms / 1000.0 for ms in header.timeouts_ms]
        joined = isinstance(header, protocol.JoinedBatch)
        signature = self._model.signatures.get(header.signature)
        if signature is None:  # the broker checks this at admission; never trust a peer
            self._fail_batch(message, header.ids if joined else None,
                             NotFound(f"no signature {header.signature!r}"))
            return
        model_s = signature.run_s
        signature.first_started = 0.0
        if not joined:
            tasks = decode_batch(message.frames, header.counts, deadlines, time.monotonic())
            outcomes = run_batch(signature, tasks, header.padded_rows)
            self._send_outcomes(header.batch, [t.request_id for t in tasks], outcomes,
                                timing=lambda: _timing(signature, model_s, received))
            return
        try:
            inputs = tensors.decode_tensors(header.inputs, message.frames)
        except ProtocolError as exc:
            log.error("malformed joined batch from the broker: %s", exc)
            self._fail_batch(message, header.ids, InvalidArgument(f"protocol error: {exc}"))
            return
        batch, expired = split_expired(header.ids, header.rows, inputs, deadlines, time.monotonic())
        if expired:  # out of time while waiting here: answered unrun; the others run without them
            live = iter(run_joined_outcomes(signature, batch, 0) if batch.ids else ())
            outcomes = [DeadlineExceeded() if i in expired else next(live) for i in range(len(header.ids))]
            self._send_outcomes(header.batch, header.ids, outcomes, timing=lambda: _timing(signature, model_s, received))
            return
        result = run_joined(signature, batch, header.padded_rows)
        if isinstance(result, list):
            self._send_outcomes(header.batch, header.ids, result, timing=lambda: _timing(signature, model_s, received))
            return
        specs, frames = tensors.encode_tensors(result)
        input_us, model_us, output_us = _timing(signature, model_s, received)
        self._send(protocol.RESULT, protocol.JoinedResult(
            batch=header.batch, model=self.config.model_name, version=self.config.version, outputs=specs,
            input_us=input_us, model_us=model_us, output_us=output_us), frames)

    def _trace_batch(self, header: Any, received: float) -> None:
        """The model's span in each traced request's trace: its calls on this batch."""
        assert self._tracer is not None
        signature = self._model.signatures.get(header.signature)
        ran = signature is not None and bool(signature.first_started)
        start, end = (signature.first_started, signature.last_ended) if ran else (received, self._peer.last_send_s)
        attributes = {"model.name": self.config.model_name, "model.version": self.config.version,
                      "model.signature": header.signature, "tfbroker.batch": header.batch,
                      "tfbroker.padded_rows": header.padded_rows, "tfbroker.model_ran": ran}
        for parent in header.traces:
            self._tracer.span("tfbroker model", parent, start, end, attributes=attributes)

    def _fail_batch(self, message: protocol.Message, ids: list[int] | None, error: TFBrokerError) -> None:
        """Every task of a batch gets ``error`` (ids read from the tasks' headers if not given)."""
        header = message.header
        if ids is None:
            ids, offset = [], 0
            for count in header.counts:
                ids.append(protocol.header_id(message.frames[offset]) or 0)
                offset += count
        self._send_outcomes(header.batch, ids, [error] * len(ids))

    def _send_outcomes(self, batch_id: int, ids: list[int], outcomes: list[Any],
                       timing: Callable[[], tuple[int, int, int]] = lambda: (0, 0, 0)) -> None:
        """A RESULT with one complete client message per task; ``timing``: the batch's µs in
        its input, model and output stages (_timing, once the answers are encoded), for the
        broker's stage latencies."""
        from workers.batch import encode_outcome

        reply_frames: list[Any] = []
        counts = []
        for request_id, outcome in zip(ids, outcomes):
            frames = encode_outcome(request_id, self.config.model_name, self.config.version, outcome)
            counts.append(len(frames))
            reply_frames.extend(frames)
        input_us, model_us, output_us = timing()
        self._send(protocol.RESULT, protocol.TaskResult(batch=batch_id, counts=counts, input_us=input_us,
                                                        model_us=model_us, output_us=output_us), reply_frames)

    def _send_ready(self) -> None:
        model = self._model
        self._send(protocol.READY, protocol.Ready(
            model=self.config.model_name, version=self.config.version, pid=os.getpid(),
            signatures={name: sig.describe() for name, sig in model.signatures.items()},
            signature_def=model.signature_def))


def _timing(signature: Any, model_before_s: float, received: float) -> tuple[int, int, int]:
    """A batch's µs before the model's first call, in its calls, and after its last (up to now:
    its outputs cut and encoded)."""
    now = time.monotonic()
    if not signature.first_started:  # the model never ran (every request out of time, or refused)
        return _micros(now - received), 0, 0
    return (_micros(signature.first_started - received), _micros(signature.run_s - model_before_s),
            _micros(now - signature.last_ended))


def _micros(seconds: float) -> int:
    return max(0, round(seconds * 1e6))
