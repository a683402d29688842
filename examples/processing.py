"""The examples' own pre- and post-processing: what TF Serving leaves no room for.

Requests name sparse features ({"features": {"f0": 1.5, "f3": -2}}); the model (the demo's
16-wide mlp, bench's 256-wide one, the tests' 8-wide one: its width is read from the model's
metadata) takes a dense, standardised float32 row. Answers give the top classes with softmax
scores, and the version that made them.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

import numpy as np

MEAN = float(os.environ.get("FEATURE_MEAN", "0.5"))
SCALE = float(os.environ.get("FEATURE_SCALE", "2.0"))
TOP_K = 3
_NAME = re.compile(r"^f(\d+)$")


def input_width(metadata: Mapping[str, Any]) -> int:
    """The width of the model's input ``x`` (float32 [batch, width]), from its metadata
    (``client.metadata(model)``, TF Serving's signature_def)."""
    try:
        dims = metadata["signature_def"]["signature_def"]["serving_default"]["inputs"]["x"]["tensor_shape"]["dim"]
        return int(dims[1]["size"])
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise ValueError(f"the model does not take x as float32 [batch, width]: {exc!r}") from exc


def preprocess(body: Any, width: int) -> dict[str, np.ndarray]:
    """{"features": {"fN": number}} -> {"x": float32 [1, width]}; ValueError says what is wrong."""
    if not isinstance(body, dict) or not isinstance(body.get("features"), dict):
        raise ValueError('send {"features": {"f0": 1.5, ...}}')
    row = np.full(width, MEAN, np.float32)  # a missing feature is the mean
    for name, value in body["features"].items():
        match = _NAME.match(name)
        if match is None or int(match.group(1)) >= width:
            raise ValueError(f"unknown feature {name!r}: f0 .. f{width - 1}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"feature {name!r} must be a number")
        row[int(match.group(1))] = value
    return {"x": ((row - MEAN) / SCALE)[np.newaxis, :]}


def postprocess(outputs: Mapping[str, np.ndarray], version: int) -> dict[str, Any]:
    logits = np.asarray(outputs["y"][0], np.float64)
    scores = np.exp(logits - logits.max())
    scores /= scores.sum()
    top = np.argsort(-scores)[:TOP_K]
    return {"top": [{"class": int(i), "score": round(float(scores[i]), 6)} for i in top],
            "model_version": version, "web_worker": os.getpid()}
