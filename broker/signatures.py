"""What clients see of a version's signatures: for a version with lookups, each lookup's raw
input (words, user ids) in place of the tensor it looks up, in the signatures admission
checks against and in TF Serving's metadata JSON."""

from __future__ import annotations

from typing import Any

from broker.models import ServedVersion
from tfbroker.wire import protocol
from tfbroker.wire.tensors import TF_NAMES


def describe_for_clients(served: ServedVersion) -> None:
    """Set ``served.signatures`` and ``signature_def`` from the model's own (its worker's
    READY) and its tables' lookups (their LOADED); again whenever either arrives."""
    served.signatures = {name: _client_signature(spec, served.lookups)
                         for name, spec in served.model_signatures.items()}
    served.signature_def = _client_signature_def(served.model_signature_def, served.lookups)


def _client_signature(spec: protocol.SignatureSpec, lookups: list[protocol.LookupSpec]) -> protocol.SignatureSpec:
    inputs = dict(spec.inputs)
    for lookup in lookups:
        if lookup.output in inputs:
            _, shape = inputs.pop(lookup.output)
            if shape is not None and lookup.dim:
                shape = shape[:-1]
            inputs[lookup.input] = (lookup.input_dtype, shape)
    return protocol.SignatureSpec(inputs=inputs, outputs=spec.outputs)


def _client_signature_def(signature_def: dict[str, Any], lookups: list[protocol.LookupSpec]) -> dict[str, Any]:
    """TF Serving's metadata JSON with the same substitution."""
    out = dict(signature_def)
    defs = {}
    for name, sig in signature_def.get("signature_def", {}).items():
        inputs = dict(sig.get("inputs", {}))
        for lookup in lookups:
            tensor = inputs.pop(lookup.output, None)
            if tensor is None:
                continue
            shape = dict(tensor.get("tensor_shape", {}))
            if lookup.dim and shape.get("dim"):
                shape["dim"] = shape["dim"][:-1]
            inputs[lookup.input] = {"dtype": "DT_" + TF_NAMES[lookup.input_dtype].upper(), "tensor_shape": shape,
                                    "name": f"{lookup.input} (looked up into {lookup.output} by tfbroker)"}
        defs[name] = {**sig, "inputs": inputs}
    out["signature_def"] = defs
    return out
