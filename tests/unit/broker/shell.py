"""Pieces for unit tests of the broker's shell (admission, dispatch, delivery, requeue): a
served version in a chosen state, worker links, and what the sockets would have carried."""

from __future__ import annotations

from typing import Any

import numpy as np

from broker import lifecycle as lc
from broker.config import BatchingParameters, ModelConfig
from broker.inflight import InFlight
from broker.links import WorkerLink
from broker.models import ServedModel, ServedVersion
from broker.supervisor import Child
from tfbroker.client import encode_predict
from tfbroker.wire import protocol

BATCHING = BatchingParameters(max_batch_size=8, batch_timeout_micros=1000, max_enqueued_batches=2)


class Wire:
    """What the broker sent: to clients (identity first) and to workers (identity, command, header)."""

    def __init__(self) -> None:
        self.to_clients: list[list[Any]] = []
        self.to_workers: list[tuple[bytes, bytes, protocol.Header, list[Any]]] = []

    def send_frontend(self, client: bytes, member: list[Any]) -> None:
        self.to_clients.append([client, protocol.TAG, *member])

    def send_backend(self, identity: bytes, command: bytes, header: protocol.Header, frames: Any) -> None:
        self.to_workers.append((identity, command, header, list(frames)))

    def answers(self) -> list[tuple[bytes, protocol.Message]]:
        """Each client answer decoded: (client, message); a RowsReply as one REPLY per request."""
        out = []
        for frames in self.to_clients:
            message = protocol.decode([bytes(f) for f in frames[1:]], protocol.BROKER_TO_CLIENT)
            if isinstance(message.header, protocol.RowsReply):
                out.extend((frames[0], answer) for answer in split_rows(message))
            else:
                out.append((frames[0], message))
        self.to_clients.clear()
        return out

    def errors(self) -> list[tuple[bytes, int | None, int]]:
        """(client, request id, HTTP status) of each ERROR sent."""
        return [(client, m.header.id, m.header.code) for client, m in self.answers() if m.command == protocol.ERROR]


def model_with(version: int, *, state: str = "available", replicas: int = 1) -> tuple[ServedModel, ServedVersion]:
    """Model ``m`` with one version that takes x float32 [batch, 2] -> y, in the given state."""
    model = ServedModel(ModelConfig(name="m", base_path="/m"))
    served = ServedVersion("m", version, f"/m/{version}", lc.Lifecycle(f"version {version}", replicas=replicas))
    signature = protocol.SignatureSpec(inputs={"x": ("float32", [-1, 2])}, outputs={"y": ("float32", [-1, 2])})
    served.model_signatures = served.signatures = {"serving_default": signature}
    served.signature_def = {"signature_def": {"serving_default": {"method_name": "tensorflow/serving/predict"}}}
    served.life.handle(lc.LoadAsked())
    if state == "available":
        for replica in range(replicas):
            served.life.handle(lc.WorkerReady(replica))
    model.versions[version] = served
    return model, served


def add_link(served: ServedVersion, replica: int = 0) -> WorkerLink:
    """The replica's worker process (its readiness is its lifecycle's: see model_with)."""
    link = WorkerLink(Child(name=f"worker {replica}", argv=[]), f"w{replica}".encode(), replica=replica)
    while len(served.workers) <= replica:
        served.workers.append(None)
    served.workers[replica] = link
    return link


def request(request_id: int, rows: int = 1, *, model: str = "m", version: int | None = None,
            timeout_s: float = 30.0, width: int = 2, name: str = "x") -> tuple[protocol.Request, list[Any]]:
    """A predict request as a client encodes it: its header, and the frames the broker
    forwards (its header frame, then its tensors)."""
    x = np.arange(rows * width, dtype=np.float32).reshape(rows, width) + request_id
    frames = encode_predict(request_id, model, {name: x}, version=version, label=None,
                            signature_name="serving_default", timeout_s=timeout_s)
    message = protocol.decode(frames, protocol.CLIENT_TO_BROKER)
    return message.header, frames[2:]


def admit(inflight: InFlight, models: dict[str, ServedModel], client: bytes, request_id: int, now: float,
          **kwargs: Any) -> None:
    header, frames = request(request_id, **kwargs)
    inflight.admit(client, header, frames, models, lambda served, signature: None, now)


def split_rows(message: protocol.Message) -> list[protocol.Message]:
    """A RowsReply as the REPLY each of its requests would have had alone, so tests read every
    answer alike (the frontends' client reads it as arrays instead: tfbroker.client.rows_predictions)."""
    reply: protocol.RowsReply = message.header
    total = sum(reply.rows)
    views = [(spec, memoryview(frame).cast("B")) for spec, frame in zip(reply.outputs, message.frames)]
    answers, start = [], 0
    for request_id, rows in zip(reply.ids, reply.rows):
        outputs = [protocol.TensorSpec(spec.name, spec.dtype, (rows, *spec.shape[1:])) for spec, _ in views]
        header = protocol.PredictReply(id=request_id, model=reply.model, version=reply.version, outputs=outputs)
        frames = [view[len(view) * start // total:len(view) * (start + rows) // total] for _, view in views]
        answers.append(protocol.Message(protocol.REPLY, header, frames))
        start += rows
    return answers
