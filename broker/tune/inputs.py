"""The requests the tuner sends: built from the model's signature (random values of each
input's dtype and shape, float32 at full precision), or taken from a file of real ones."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

UNKNOWN_DIM = 8  # an inner dimension the signature leaves open (a sequence's length)
FLOATS = {"DT_FLOAT", "DT_DOUBLE", "DT_HALF", "DT_BFLOAT16"}
INTS = {"DT_INT8", "DT_INT16", "DT_INT32", "DT_INT64", "DT_UINT8", "DT_UINT16", "DT_UINT32", "DT_UINT64"}


def synthetic_bodies(metadata: dict[str, Any], signature: str, rows: int, count: int = 16,
                     seed: int = 0) -> list[bytes]:
    """``count`` TF Serving REST predict bodies (columnar ``inputs``) of ``rows`` rows each."""
    try:
        inputs = metadata["metadata"]["signature_def"]["signature_def"][signature]["inputs"]
    except KeyError as exc:
        raise ValueError(f"the model has no signature {signature!r}") from exc
    rng = random.Random(seed)
    bodies = []
    for _ in range(count):
        columns = {name: _values(spec, rows, rng) for name, spec in inputs.items()}
        bodies.append(json.dumps({"signature_name": signature, "inputs": columns}).encode())
    return bodies


def file_bodies(path: str) -> list[bytes]:
    """Real requests: one TF Serving REST predict body (JSON) per line."""
    bodies = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            json.loads(line)
        except ValueError as exc:
            raise ValueError(f"{path}:{number}: not a JSON predict body: {exc}") from exc
        bodies.append(line.encode())
    if not bodies:
        raise ValueError(f"{path} holds no requests")
    return bodies


def _values(spec: dict[str, Any], rows: int, rng: random.Random) -> Any:
    dims = [int(d.get("size", -1)) for d in spec.get("tensor_shape", {}).get("dim", [])]
    if spec.get("tensor_shape", {}).get("unknown_rank"):
        dims = [-1]
    shape = [rows if i == 0 else (d if d > 0 else UNKNOWN_DIM) for i, d in enumerate(dims)] if dims else []
    dtype = spec.get("dtype", "DT_FLOAT")
    return _nested(shape, lambda: _scalar(dtype, rng))


def _scalar(dtype: str, rng: random.Random) -> Any:
    if dtype in FLOATS:
        return rng.random() * 2 - 1
    if dtype in INTS:
        return rng.randrange(10)  # small ids: valid for any embedding table
    if dtype == "DT_BOOL":
        return rng.random() < 0.5
    if dtype == "DT_STRING":
        return f"w{rng.randrange(100)}"
    raise ValueError(f"cannot make values of {dtype} (give --requests with real ones)")


def _nested(shape: list[int], make: Any) -> Any:
    if not shape:
        return make()
    return [_nested(shape[1:], make) for _ in range(shape[0])]
