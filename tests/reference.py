"""In-process TensorFlow outputs, computed in a child: ``python tests/reference.py MODEL IN.npz OUT.npz``."""

from __future__ import annotations

import sys

import numpy as np
import tensorflow as tf


def main(model: str, inputs_path: str, outputs_path: str) -> None:
    fn = tf.saved_model.load(model).signatures["serving_default"]
    with np.load(inputs_path) as data:
        batches = sorted({key.split("/")[0] for key in data.files})
        results = {}
        for batch in batches:
            feeds = {key.split("/")[1]: tf.constant(data[key]) for key in data.files if key.startswith(batch + "/")}
            for name, value in fn(**feeds).items():
                array = value.numpy()
                results[f"{batch}/{name}"] = array.astype("S") if array.dtype == object else array  # no pickle
    np.savez(outputs_path, **results)


if __name__ == "__main__":
    main(*sys.argv[1:])
