"""KServe's own clients (its Python SDK's InferenceRESTClient and InferenceGRPCClient) as its
users call them, in a child of the test: the SDK registers the Open Inference Protocol's
messages in protobuf's default pool, as tritonclient does in the test's process.

    python tests/system/kserve_client.py REST_URL GRPC_TARGET MODEL < inputs.json

``inputs.json`` is ``{name: [datatype, nested list]}``; prints JSON: for each client, whether
the server and model are ready, the model version and the outputs as lists, and the error of
a request for a model that does not exist.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import numpy as np
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig


def request(model: str, inputs: dict[str, Any], *, binary: bool) -> InferRequest:
    given = []
    for name, (datatype, values) in inputs.items():
        array = np.array(values, dtype={"FP32": np.float32, "INT64": np.int64}[datatype])
        tensor = InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array, binary_data=binary)
        given.append(tensor)
    return InferRequest(model_name=model, infer_inputs=given, request_id="kserve-1")


def outputs(response: Any) -> dict[str, Any]:
    """Each output as a list, strings (BYTES) as text."""
    return {output.name: [v.decode() if isinstance(v, bytes) else v for v in output.as_numpy().reshape(-1).tolist()]
            for output in response.outputs}


async def main(rest_url: str, grpc_target: str, model: str, inputs: dict[str, Any]) -> dict[str, Any]:
    answers: dict[str, Any] = {}
    rest = InferenceRESTClient(RESTConfig(protocol="v2", retries=0, timeout=30))
    for binary in (False, True):
        key = "rest binary" if binary else "rest json"
        response = await rest.infer(rest_url, request(model, inputs, binary=binary), model_name=model)
        answers[key] = {"id": response.id, "version": response.model_version, "outputs": outputs(response),
                        "ready": await rest.is_server_ready(rest_url) and await rest.is_model_ready(rest_url, model)}
    try:
        await rest.infer(rest_url, request("no_such_model", inputs, binary=False), model_name="no_such_model")
    except Exception as exc:  # noqa: BLE001 - the SDK's own error type is what is reported
        answers["rest error"] = f"{type(exc).__name__}: {exc}"
    await rest.close()
    rpc = InferenceGRPCClient(grpc_target, retries=0, timeout=30)
    response = await rpc.infer(request(model, inputs, binary=False))
    answers["grpc"] = {"id": response.id, "version": response.model_version, "outputs": outputs(response),
                       "ready": await rpc.is_server_ready() and await rpc.is_model_ready(model)}
    try:
        await rpc.infer(request("no_such_model", inputs, binary=False))
    except Exception as exc:  # noqa: BLE001
        answers["grpc error"] = f"{type(exc).__name__}: {exc}"
    await rpc.close()
    return answers


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], json.load(sys.stdin)))))
