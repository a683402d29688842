"""TF Serving's request logs (a model's ``logging_config``), written by each frontend.

Each frontend asks the broker every REFRESH_S which models log (LOGGING: their sampling rate
and filename prefix), samples each successful predict, classify and regress of those models at
its rate, whichever API it came by, and hands the request and its answer to one writer thread
through a bounded queue: the request path copies a few references and never waits. The writer
builds TF Serving's ``PredictionLog``: a ``PredictLog`` (PredictRequest, PredictResponse), a
``ClassifyLog`` or a ``RegressLog`` (the request's tf.Examples, context merged in, and the
result), with ``LogMetadata`` (the model spec, the sampling config, the saved-model tags, the
time), and appends it to a TFRecord file
``{filename_prefix}-{start time}-{pid}-{n:05d}.tfrecord``, one per frontend at a time, the
next once it passes ``--request_log_max_file_bytes``. ``tf.data.TFRecordDataset`` reads them.

A record that cannot be written is dropped and counted, never retried or waited for: the
queue is full (the disk is slower than the requests), or the write fails (a full disk: the
file is cut back to its last whole record, so what is there stays readable). Counted in
TF Serving's ``:tensorflow:serving:request_log_count{model_name, status_code}``: OK when
written, RESOURCE_EXHAUSTED when dropped for a full queue or disk, INTERNAL for another
write error.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import logging
import os
import queue
import random
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import google_crc32c
import numpy as np

from frontend import grpc_messages as pb
from frontend.grpc_tensors import to_proto
from frontend.model_call import CLASSIFY, REGRESS, ModelCall
from frontend.tf_example import fill_classifications, fill_regressions
from tfbroker.async_client import AsyncClient
from tfbroker.client import Prediction
from tfbroker.wire.errors import TFBrokerError
from tfbroker.wire.tensors import RawTensor

log = logging.getLogger("tfbroker.frontend")

REFRESH_S = 2.0  # how soon a frontend follows a changed logging_config
QUEUE_RECORDS = 10_000  # records waiting for the writer at most; beyond, dropped
OK, DROPPED, FAILED = "OK", "RESOURCE_EXHAUSTED", "INTERNAL"  # request_log_count's status codes


@dataclass(slots=True)
class Target:
    """One model's log, as the broker says (LOGGING)."""

    sampling_rate: float
    filename_prefix: str
    only_inputs: dict[str, dict[str, str]] = field(default_factory=dict)  # version -> signature -> input


class RequestLog:
    """The owner of one frontend's request logs: the sampling, the queue, the writer thread."""

    def __init__(self, client: AsyncClient, *, max_file_bytes: int, counter: Any = None) -> None:
        self.client = client
        self.max_file_bytes = max_file_bytes
        self.counter = counter  # the Prometheus counter, when the frontend has metrics
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()  # (model, status) -> records
        self.targets: dict[str, Target] = {}  # replaced whole by each refresh: read without a lock
        self.saved_model_tags: list[str] = []
        self._queue: queue.Queue[Any] = queue.Queue(QUEUE_RECORDS)
        self._writers: dict[str, TFRecordFile] = {}  # filename prefix -> its current file
        self._thread = threading.Thread(target=self._write_all, name="request-log", daemon=True)
        self._refresher: asyncio.Task[None] | None = None
        # A record of a version whose signatures the last word did not name waits for a fresh
        # one (the writer asks the loop for it at once): its one unnamed input is named as the
        # broker names it.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ask_now = asyncio.Event()
        self._refreshed = threading.Condition()
        self._started = self._done = 0  # the refreshes begun, and the number of the last one done

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread.start()
        self._refresher = self._loop.create_task(self._refresh())

    async def stop(self) -> None:
        """Write what is queued, then close the files."""
        if self._refresher is not None:
            self._refresher.cancel()
        await asyncio.get_running_loop().run_in_executor(None, self._finish)

    def _finish(self, timeout_s: float = 10.0) -> None:
        """(In an executor: the put waits while the queue is full.)"""
        try:
            self._queue.put(None, timeout=timeout_s)
        except queue.Full:
            log.error("request log: the writer did not drain its queue in %.0f s; its records are lost", timeout_s)
            return
        self._thread.join(timeout_s)

    def offer(self, call: ModelCall, prediction: Prediction) -> None:
        """A successful predict, classify or regress: queued for the log if its model logs and
        it is sampled."""
        target = self.targets.get(call.model)
        if target is None or random.random() >= target.sampling_rate:
            return
        try:
            self._queue.put_nowait((target, call.verb, call.inputs, call.signature_name, prediction, time.time()))
        except queue.Full:  # the writer is behind: never wait for it
            self._count(call.model, DROPPED)

    # --- the broker's word on what to log ---

    async def _refresh(self) -> None:
        while True:
            with self._refreshed:
                self._started += 1
                number = self._started
            try:
                answer = await self.client.request_logging()
            except TFBrokerError as exc:
                log.debug("request logs: the broker did not say which models log (%s); keeping the last word", exc)
            else:
                self.saved_model_tags = list(answer.get("saved_model_tags", []))
                self.targets = {name: Target(float(spec["sampling_rate"]), str(spec["filename_prefix"]),
                                             dict(spec.get("only_inputs", {})))
                                for name, spec in answer.get("models", {}).items()}
            with self._refreshed:
                self._done = number
                self._refreshed.notify_all()
            try:
                await asyncio.wait_for(self._ask_now.wait(), REFRESH_S)
            except asyncio.TimeoutError:
                pass
            self._ask_now.clear()

    # --- the writer thread ---

    def _write_all(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                break
            target, verb, inputs, signature, prediction, when = item
            try:
                record = self._record(target, verb, inputs, signature, prediction, when)
                writer = self._writers.get(target.filename_prefix)
                if writer is None:
                    writer = self._writers[target.filename_prefix] = TFRecordFile(target.filename_prefix,
                                                                                  self.max_file_bytes)
                writer.append(record)
            except OSError as exc:
                full = exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
                self._count(prediction.model, DROPPED if full else FAILED)
                if self.counts[(prediction.model, DROPPED if full else FAILED)] == 1:
                    log.error("request log of model %s: %s; records are dropped (and counted) while it lasts",
                              prediction.model, exc)
            except Exception:  # noqa: BLE001 - a record that cannot be built is counted, the thread goes on
                log.exception("request log of model %s: a record could not be built", prediction.model)
                self._count(prediction.model, FAILED)
            else:
                self._count(prediction.model, OK)
        for writer in self._writers.values():
            writer.close()

    def _record(self, target: Target, verb: str, inputs: Any, signature: str, prediction: Prediction,
                when: float) -> bytes:
        """TF Serving's PredictionLog of one request and its answer, serialized. ``inputs``: a
        predict's tensors by name, or a classify's or regress's serialized tf.Examples."""
        entry = pb.PredictionLog()
        metadata = entry.log_metadata
        spec = metadata.model_spec
        spec.name = prediction.model
        spec.version.value = prediction.version
        spec.signature_name = signature
        metadata.sampling_config.sampling_rate = target.sampling_rate
        metadata.saved_model_tags.extend(self.saved_model_tags)
        metadata.timestamp_secs = int(when)
        if verb in (CLASSIFY, REGRESS):
            log_entry = entry.classify_log if verb == CLASSIFY else entry.regress_log
            log_entry.request.model_spec.CopyFrom(spec)
            log_entry.response.model_spec.CopyFrom(spec)
            for example in inputs:
                log_entry.request.input.example_list.examples.add().ParseFromString(example)
            fill = fill_classifications if verb == CLASSIFY else fill_regressions
            fill(log_entry.response.result, prediction.outputs, len(inputs))
            return entry.SerializeToString()
        request, response = entry.predict_log.request, entry.predict_log.response
        request.model_spec.CopyFrom(spec)
        response.model_spec.CopyFrom(spec)
        only = self._only_input(target, prediction.model, str(prediction.version), signature) if "" in inputs else ""
        for name, value in inputs.items():
            request.inputs[name or only].CopyFrom(_tensor(value))
        for name, value in prediction.outputs.items():
            response.outputs[name].CopyFrom(_tensor(value))
        return entry.SerializeToString()

    def _only_input(self, target: Target, model: str, version: str, signature: str, wait_s: float = 5.0) -> str:
        """The name of a signature's one input (the writer's: it may wait for the broker's
        word on a version loaded, or still loading, at its last word), or "" if the broker
        does not name one."""
        if signature not in target.only_inputs.get(version, {}) and self._loop is not None:
            with self._refreshed:
                fresh = self._started + 1  # the first refresh to begin after this record's answer
                self._loop.call_soon_threadsafe(self._ask_now.set)
                self._refreshed.wait_for(lambda: self._done >= fresh, wait_s)
            target = self.targets.get(model, target)
        return target.only_inputs.get(version, {}).get(signature, "")

    def _count(self, model: str, status: str) -> None:
        self.counts[(model, status)] += 1
        if self.counter is not None:
            self.counter.labels(model, status).inc()


def _tensor(value: Any) -> Any:
    if isinstance(value, RawTensor):
        value = np.frombuffer(value.data, dtype=value.dtype).reshape(value.shape)
    array = np.asarray(value)
    if array.dtype == object or array.dtype.kind in "US":
        array = np.array([v.encode() if isinstance(v, str) else bytes(v) for v in array.reshape(-1).tolist()],
                         dtype=object).reshape(array.shape)
    return to_proto(array, as_content=array.dtype != object)


class TFRecordFile:
    """TFRecord files of one prefix, rotated by size: each record is its length (8 bytes,
    little-endian), the length's masked CRC-32C, the data and the data's masked CRC-32C
    (TensorFlow's format). Written unbuffered, one system call a record; a failed write is
    cut back to the last whole record."""

    def __init__(self, prefix: str, max_bytes: int) -> None:
        self.prefix = prefix
        self.max_bytes = max_bytes
        self.started = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        self.index = 0
        self.fd = -1
        self.size = 0

    def append(self, data: bytes) -> None:
        if self.fd < 0 or self.size >= self.max_bytes:
            self._next_file()
        length = struct.pack("<Q", len(data))
        record = b"".join((length, struct.pack("<I", _masked_crc(length)), data, struct.pack("<I", _masked_crc(data))))
        try:
            written = os.write(self.fd, record)
            if written != len(record):
                raise OSError(errno.ENOSPC, "short write")
        except OSError:
            os.ftruncate(self.fd, self.size)  # the file ends with its last whole record
            raise
        self.size += len(record)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _next_file(self) -> None:
        self.close()
        self.index += 1
        path = f"{self.prefix}-{self.started}-{os.getpid()}-{self.index:05d}.tfrecord"
        directory = os.path.dirname(path)
        if directory:
            os.makedirs(directory, exist_ok=True)
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        self.size = 0


def _masked_crc(data: bytes) -> int:
    crc = google_crc32c.value(data)
    return ((crc >> 15 | crc << 17) + 0xA282EAD8) & 0xFFFFFFFF
