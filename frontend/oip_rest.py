"""The Open Inference Protocol over REST (KServe v2), under ``/v2/`` on the REST port.

    GET  /v2                                        server metadata and its extensions
    GET  /v2/health/live                            200 while the process answers
    GET  /v2/health/ready                           200 once the broker serves its initial models,
                                                    503 before and while stopping
    GET  /v2/models/M[/versions/V]                  model metadata (serving_default's tensors)
    GET  /v2/models/M[/versions/V]/ready            200 when that model (version) takes requests
    POST /v2/models/M[/versions/V]/infer            inference
    POST /v2/repository/index                       the model repository extension: every model's
    POST /v2/repository/models/M/load | /unload     versions and states; load and unload with the
                                                    broker's --enable_model_control

V is a version number or a version label, as TF Serving's ``/labels/`` paths. An inference
request's tensors are JSON or binary (Triton's binary tensor data extension, with
``Inference-Header-Content-Length``: frontend/oip_tensors.py); outputs are JSON unless asked
as binary (``binary_data`` on an output, ``binary_data_output`` on the request). The
request parameter ``signature_name`` picks a signature other than serving_default. Errors are
``{"error": "…"}`` with the status of their class (tfbroker/wire/errors.py): 400 bad input,
404 unknown model or version, 503 not ready or overloaded, 504 deadline.

Every model call goes through the frontend's Pipeline, like TF Serving's API's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import orjson

from frontend import oip_tensors
from frontend.oip_stats import model_statistics
from frontend.answers import JSON, Answer, error_answer
from frontend.model_call import METADATA, PREDICT, REPOSITORY, ModelCall
from frontend.pipeline import Pipeline
from tfbroker.client import Prediction
from tfbroker.wire.errors import InvalidArgument, NotFound, TFBrokerError

PREFIX = "/v2"
HEADER_LENGTH = b"inference-header-content-length"
TIMEOUT_HEADER = b"x-request-timeout-ms"
OCTETS = (b"content-type", b"application/octet-stream")
NUMPY = orjson.OPT_SERIALIZE_NUMPY

_MODEL = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?(/ready|/infer|/stats)?")
_REPOSITORY = re.compile(r"/v2/repository/models/([^/]+)/(load|unload)")

def is_oip_path(path: str) -> bool:
    return path == PREFIX or path.startswith("/v2/")


@dataclass(frozen=True, slots=True)
class InferCall:
    """An inference request's path, parsed: what the HTTP protocol's direct path hands back."""

    model: str
    version: int | None
    label: str | None


def infer_call(path: str) -> InferCall | None:
    """The inference call ``path`` makes, or None for any other path (or a version out of range)."""
    match = _MODEL.fullmatch(path)
    if match is None or match[3] != "/infer":
        return None
    try:
        version, label = oip_tensors.version_or_label(unquote(match[2] or ""))
    except TFBrokerError:
        return None
    return InferCall(unquote(match[1]), version, label)


def answer_type(answer: Answer) -> tuple[bytes, bytes]:
    """The content type of an answer: binary when it carries binary tensors."""
    return OCTETS if any(name == HEADER_LENGTH for name, _ in answer[2]) else JSON


class OipRest:
    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline

    async def answer(self, method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes) -> Answer:
        try:
            return await self._route(method, path, headers, body)
        except TFBrokerError as exc:
            return error_answer(exc)

    async def _route(self, method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes) -> Answer:
        if path in (PREFIX, PREFIX + "/"):
            _expect(method, "GET", path)
            return _json(oip_tensors.SERVER_METADATA)
        if path == "/v2/health/live":
            _expect(method, "GET", path)
            return _json({"live": True})
        if path == "/v2/health/ready":
            _expect(method, "GET", path)
            ready, reason = await self.pipeline.ready()
            return _json({"ready": True}) if ready else _json({"ready": False, "error": reason}, 503)
        if path == "/v2/repository/index":
            _expect(method, "POST", path)
            request = _object(body) if body.strip() else {}
            return await self.repository("index", "", request.get("ready") is True)
        if match := _REPOSITORY.fullmatch(path):
            _expect(method, "POST", path)
            if body.strip():
                _object(body)  # (its parameters, a config to load with, are not taken: the broker's config is)
            return await self.repository(match[2], unquote(match[1]), False)
        if path == "/v2/models/stats":  # every model's (the statistics extension)
            _expect(method, "GET", path)
            return await self.statistics("", None, None)
        match = _MODEL.fullmatch(path)
        if match is None:
            raise NotFound(f"{method} {path} is not part of the Open Inference Protocol")
        model = unquote(match[1])
        version, label = oip_tensors.version_or_label(unquote(match[2] or ""))
        if match[3] == "/infer":
            _expect(method, "POST", path)
            return await self.infer(model, version, label, headers, body)
        _expect(method, "GET", path)
        if match[3] == "/stats":
            return await self.statistics(model, version, label)
        if match[3] == "/ready":
            ready, reason = await self.pipeline.ready(model, version, label)
            return _json({"name": model, "ready": ready, **({} if ready else {"error": reason})},
                         200 if ready else 503)
        return await self.metadata(model, version, label)

    async def infer(self, model: str, version: int | None, label: str | None, headers: list[tuple[bytes, bytes]],
                    body: bytes) -> Answer:
        """One inference: an error as its answer too."""
        async def parse() -> ModelCall:
            return parse_infer(model, version, label, headers, body)

        try:
            return await self.pipeline.run("REST", PREDICT, model, parse, format_infer, headers)
        except TFBrokerError as exc:
            return error_answer(exc)

    async def repository(self, op: str, model: str, ready_only: bool) -> Answer:
        async def parse() -> ModelCall:
            return ModelCall(REPOSITORY, model, inputs=(op, ready_only))

        def answer(call: ModelCall, reply: dict[str, Any]) -> Answer:
            return (200, orjson.dumps(reply["models"]), []) if op == "index" else (200, b"", [])

        return await self.pipeline.run("REST", REPOSITORY, model, parse, answer)

    async def statistics(self, model: str, version: int | None, label: str | None) -> Answer:
        stats = await self.pipeline.client.stats_reply()
        return _json({"model_stats": model_statistics(stats, model, version, label)})

    async def metadata(self, model: str, version: int | None, label: str | None) -> Answer:
        async def parse() -> ModelCall:
            status = await self.pipeline.client.status(model)  # the versions a caller may ask for
            return ModelCall(METADATA, model, version, label, answer_as=oip_tensors.available_versions(status))

        return await self.pipeline.run("REST", METADATA, model, parse, format_metadata)


def parse_infer(model: str, version: int | None, label: str | None, headers: list[tuple[bytes, bytes]],
                body: bytes) -> ModelCall:
    """An inference request's JSON and binary parts as a ModelCall."""
    header_length = asked_s = None
    for name, value in headers:
        if name == HEADER_LENGTH:
            if not value.isdigit() or int(value) > len(body):
                raise InvalidArgument(f"Inference-Header-Content-Length {value.decode(errors='replace')!r} is not "
                                      f"a length within the body's {len(body)} bytes")
            header_length = int(value)
        elif name == TIMEOUT_HEADER:
            if not value.isdigit() or int(value) < 1:
                raise InvalidArgument("X-Request-Timeout-Ms must be a positive integer")
            asked_s = int(value) / 1000.0
    if header_length == 0:
        raise InvalidArgument("a request without its JSON header (Inference-Header-Content-Length: 0) is not "
                              "supported: send the header with each input's name, shape and datatype")
    text = body if header_length is None else body[:header_length]
    request = _object(text)
    binary = memoryview(body)[header_length:] if header_length is not None else memoryview(b"")
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidArgument("'inputs' must be a non-empty array of tensors")
    parameters = _parameters(request, "request")
    literals = b"true" in text or b"false" in text or b"null" in text
    tensors: dict[str, Any] = {}
    at = 0
    for item in inputs:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise InvalidArgument("each input must be an object with a 'name'")
        name = item["name"]
        if name in tensors:
            raise InvalidArgument(f"input '{name}' is given twice")
        dtype = oip_tensors.datatype_dtype(name, item.get("datatype"))
        shape = oip_tensors.checked_shape(name, item.get("shape"))
        size = _parameters(item, f"input '{name}'").get("binary_data_size")
        if size is not None:
            if type(size) is not int or size < 0 or at + size > len(binary):
                raise InvalidArgument(f"input '{name}': binary_data_size {size!r} runs past the body's "
                                      f"{len(binary)} binary bytes")
            tensors[name] = oip_tensors.from_binary(name, dtype, shape, binary[at:at + size])
            at += size
        elif "data" in item:
            tensors[name] = oip_tensors.from_json_data(name, dtype, shape, item["data"], literals=literals)
        else:
            raise InvalidArgument(f"input '{name}' has neither 'data' nor a binary_data_size parameter")
    if at != len(binary):
        raise InvalidArgument(f"{len(binary) - at} bytes of binary data after the inputs that announce theirs")
    outputs = request.get("outputs")
    asked: list[tuple[str, bool]] | None = None
    all_binary = parameters.get("binary_data_output") is True
    if outputs is not None:
        if not isinstance(outputs, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str)
                                                    for o in outputs):
            raise InvalidArgument("'outputs' must be an array of objects with a 'name'")
        asked = [(o["name"], _parameters(o, f"output '{o['name']}'").get("binary_data", all_binary) is True)
                 for o in outputs]
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidArgument("'id' must be a string")
    signature = parameters.get("signature_name", "serving_default")
    if not isinstance(signature, str):
        raise InvalidArgument("the parameter 'signature_name' must be a string")
    return ModelCall(PREDICT, model, version, label, signature, tensors, exact_dtypes=True, timeout_s=asked_s,
                     answer_as=(request_id, asked, all_binary))


def format_infer(call: ModelCall, prediction: Prediction) -> Answer:
    request_id, asked, all_binary = call.answer_as
    outputs = prediction.outputs
    if asked is None:
        chosen = [(name, all_binary) for name in outputs]
    else:
        missing = [name for name, _ in asked if name not in outputs]
        if missing:
            raise InvalidArgument(f"output '{missing[0]}' is not an output of the signature; it has "
                                  f"{', '.join(sorted(outputs))}")
        chosen = asked
    described, blobs = [], []
    for name, binary in chosen:
        array = outputs[name]
        tensor: dict[str, Any] = {"name": name, "datatype": oip_tensors.output_datatype(array),
                                  "shape": list(array.shape)}
        if binary:
            blob = oip_tensors.to_binary(array)
            tensor["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            tensor["data"] = oip_tensors.to_json_data(array)
        described.append(tensor)
    response: dict[str, Any] = {"model_name": call.model, "model_version": str(prediction.version)}
    if request_id is not None:
        response["id"] = request_id
    response["outputs"] = described
    head = orjson.dumps(response, option=NUMPY)
    if not blobs:
        return 200, head, []
    return 200, b"".join([head, *blobs]), [(HEADER_LENGTH, str(len(head)).encode())]


def format_metadata(call: ModelCall, reply: dict[str, Any]) -> Answer:
    return _json(oip_tensors.describe_model(call.model, call.answer_as, reply))


# --- implementation ---

def _expect(method: str, wanted: str, path: str) -> None:
    if method != wanted:
        raise InvalidArgument(f"{path} takes {wanted}, not {method}")


def _object(text: bytes | memoryview) -> dict[str, Any]:
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise InvalidArgument(f"the request is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise InvalidArgument("the request must be a JSON object")
    return value


def _parameters(owner: dict[str, Any], what: str) -> dict[str, Any]:
    parameters = owner.get("parameters", {})
    if not isinstance(parameters, dict):
        raise InvalidArgument(f"{what}: 'parameters' must be an object")
    return parameters


def _json(body: Any, status: int = 200) -> Answer:
    return status, orjson.dumps(body), []


