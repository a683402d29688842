"""SavedModels made on the spot with TensorFlow, in TF Serving's ``BASE/VERSION`` layout.

Used by ``python -m broker`` with no model flags (the demo), by the tests and by bench/.
``python -m workers.demo_models DIR`` writes DIR/half_plus_two/1 and DIR/mlp/1.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

import numpy as np
import tensorflow as tf


def save_linear(path: str, *, a: float = 0.5, b: float = 2.0) -> None:
    """y = a*x + b on float32 x of shape [batch], like TF Serving's half_plus_two."""

    class Linear(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = tf.Variable(a, dtype=tf.float32)
            self.b = tf.Variable(b, dtype=tf.float32)

        @tf.function(input_signature=[tf.TensorSpec([None], tf.float32, name="x")])
        def serve(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
            return {"y": self.a * x + self.b}

    module = Linear()
    tf.saved_model.save(module, path, signatures={"serving_default": module.serve})


def save_mlp(path: str, *, input_dim: int = 256, hidden: int = 1024, layers: int = 3,
             outputs: int = 16, seed: int = 0) -> None:
    """A ReLU MLP on x float32 [batch, input_dim] -> y float32 [batch, outputs], fixed seed."""
    rng = np.random.default_rng(seed)
    sizes = [input_dim] + [hidden] * layers + [outputs]
    weights = [(rng.standard_normal((m, n)) / np.sqrt(m)).astype(np.float32) for m, n in zip(sizes, sizes[1:])]
    biases = [np.zeros(n, np.float32) for n in sizes[1:]]

    class MLP(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = [tf.Variable(w) for w in weights]
            self.b = [tf.Variable(b) for b in biases]

        @tf.function(input_signature=[tf.TensorSpec([None, input_dim], tf.float32, name="x")])
        def serve(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
            h = x
            for i, (w, b) in enumerate(zip(self.w, self.b)):
                h = tf.matmul(h, w) + b
                if i < len(self.w) - 1:
                    h = tf.nn.relu(h)
            return {"y": h}

    module = MLP()
    tf.saved_model.save(module, path, signatures={"serving_default": module.serve})


def make_demo_models(directory: str) -> None:
    """Each model is written beside its place and renamed into it, so an interrupted run
    never leaves a half-written model that a later run would take for a finished one."""
    builders = {
        "half_plus_two": lambda path: save_linear(path),
        "mlp": lambda path: save_mlp(path, input_dim=16, hidden=64, layers=2, outputs=4),
    }
    os.makedirs(directory, exist_ok=True)
    for name, build in builders.items():
        final = os.path.join(directory, name)
        if os.path.isdir(os.path.join(final, "1")):
            continue
        staging = tempfile.mkdtemp(prefix=f".{name}-", dir=directory)
        build(os.path.join(staging, "1"))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m workers.demo_models DIR")
    make_demo_models(sys.argv[1])
