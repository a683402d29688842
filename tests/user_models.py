"""Models of the kinds users bring, made with TensorFlow in a child process:
``python tests/user_models.py DIR``. Each is version 1 under DIR/NAME.

- conv/1: a Keras 3 Conv2D classifier exported with ``model.export``: image float32
  [-1, 32, 32, 3] -> output_0 float32 [-1, 10] (softmax). A wrong rank reaches a kernel
  that aborts the process (tensor_format.h), which is why inputs are checked first.
- embed/1: a Keras Embedding on int64 ids [-1, 5] (vocabulary 100) -> float32 [-1, 4].
  An id out of range is a model error (InvalidArgument), not a crash.
- lstm/1: a Keras LSTM over float32 [-1, 6, 3] (6 steps, 3 features) -> float32 [-1, 2].
- mixed/1: a tf.Module, inputs ``ids`` int32 [-1, 3] and ``weights`` float64 [-1]; outputs
  ``total`` float32 [-1] and ``tag`` string [-1].
- words/1: strings in and out: ``text`` string [-1] -> ``upper`` string [-1] and
  ``length`` int32 [-1].
- lite/1: both formats in one version directory, so a test sees which one served: a
  SavedModel with y = 2x + 1 and a TensorFlow Lite model.tflite with y = 3x + 1 (and
  ``k2`` = 2k), inputs x float32 [-1, 2] (y sums the row) and k int32 [-1].
  lite_only/1: the same model.tflite alone.
- poison/1: y = 2x on x float32 [-1], except that a row equal to 666 makes the process abort
  inside a TensorFlow kernel (a CHECK that fails on values, the kind TensorFlow's security
  advisories list): what defence in depth must contain.
"""

from __future__ import annotations

import os
import sys

import numpy as np

import tensorflow as tf

POISON = 666.0  # the value of x that aborts poison/1


def save_conv(path: str) -> None:
    import keras

    keras.utils.set_random_seed(3)
    model = keras.Sequential([
        keras.Input((32, 32, 3), name="image"),
        keras.layers.Conv2D(4, 3, activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        keras.layers.Dense(10, activation="softmax"),
    ])
    model.export(path, verbose=False)


def save_embed(path: str) -> None:
    import keras

    keras.utils.set_random_seed(4)
    model = keras.Sequential([
        keras.Input((5,), dtype="int64", name="ids"),
        keras.layers.Embedding(100, 4),
        keras.layers.GlobalAveragePooling1D(),
    ])
    model.export(path, verbose=False)


def save_lstm(path: str) -> None:
    import keras

    keras.utils.set_random_seed(5)
    model = keras.Sequential([keras.Input((6, 3), name="steps"), keras.layers.LSTM(2)])
    model.export(path, verbose=False)


class Mixed(tf.Module):
    @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.int32, name="ids"),
                                  tf.TensorSpec([None], tf.float64, name="weights")])
    def serve(self, ids: tf.Tensor, weights: tf.Tensor) -> dict[str, tf.Tensor]:
        total = tf.cast(tf.reduce_sum(ids, axis=1), tf.float32) * tf.cast(weights, tf.float32)
        return {"total": total, "tag": tf.strings.as_string(tf.reduce_max(ids, axis=1))}


class Words(tf.Module):
    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="text")])
    def serve(self, text: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"upper": tf.strings.upper(text), "length": tf.strings.length(text)}


class Poison(tf.Module):
    @tf.function(input_signature=[tf.TensorSpec([None], tf.float32, name="x")])
    def serve(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
        bad = tf.reduce_any(tf.equal(x, POISON))
        # The abort: a rank-1 tensor (of a rank unknown to the graph) fed to Conv2D, whose
        # oneDNN kernel reads a fourth dimension without checking the rank (a CHECK fails).
        abort = tf.cond(bad, lambda: tf.reduce_sum(_aborting_op(x)) * 0.0, lambda: tf.constant(0.0))
        return {"y": x * 2.0 + abort}


def _aborting_op(x: tf.Tensor) -> tf.Tensor:
    dims = tf.shape(x)
    unknown_rank = tf.reshape(x, tf.boolean_mask(dims, tf.ones_like(dims) > 0))
    return tf.raw_ops.Conv2D(input=unknown_rank, filter=tf.ones([1, 1, 1, 1]), strides=[1, 1, 1, 1],
                             padding="VALID")


class Lite(tf.Module):
    def __init__(self, slope: float) -> None:
        super().__init__()
        self.slope = slope

    @tf.function(input_signature=[tf.TensorSpec([None, 2], tf.float32, name="x"),
                                  tf.TensorSpec([None], tf.int32, name="k")])
    def serve(self, x: tf.Tensor, k: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"y": tf.reduce_sum(x, axis=1) * self.slope + 1.0, "k2": k * 2}


def save_lite(path: str, *, with_saved_model: bool) -> None:
    """model.tflite (y = 3·sum(x) + 1), converted with TFLiteConverter, beside a SavedModel
    with y = 2·sum(x) + 1 when asked."""
    if with_saved_model:
        save_module(Lite(2.0), path)
    lite = Lite(3.0)
    converter = tf.lite.TFLiteConverter.from_concrete_functions([lite.serve.get_concrete_function()], lite)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "model.tflite"), "wb") as fh:
        fh.write(converter.convert())


def save_module(module: tf.Module, path: str) -> None:
    tf.saved_model.save(module, path, signatures={"serving_default": module.serve})


def main(directory: str) -> None:
    save_conv(os.path.join(directory, "conv", "1"))
    save_embed(os.path.join(directory, "embed", "1"))
    save_lstm(os.path.join(directory, "lstm", "1"))
    save_module(Mixed(), os.path.join(directory, "mixed", "1"))
    save_module(Words(), os.path.join(directory, "words", "1"))
    save_module(Poison(), os.path.join(directory, "poison", "1"))
    save_lite(os.path.join(directory, "lite", "1"), with_saved_model=True)
    save_lite(os.path.join(directory, "lite_only", "1"), with_saved_model=False)


def example_inputs(name: str, rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Valid inputs for each model above, ``rows`` of them."""
    rng = np.random.default_rng(seed)
    if name == "conv":
        return {"image": rng.random((rows, 32, 32, 3), dtype=np.float32)}
    if name == "embed":
        return {"ids": rng.integers(0, 100, (rows, 5), dtype=np.int64)}
    if name == "lstm":
        return {"steps": rng.standard_normal((rows, 6, 3)).astype(np.float32)}
    if name == "mixed":
        return {"ids": rng.integers(-5, 5, (rows, 3), dtype=np.int32), "weights": rng.random(rows)}
    if name == "words":
        return {"text": np.array([f"w{i}ord" for i in range(rows)], dtype=object)}
    if name == "poison":
        return {"x": rng.random(rows, dtype=np.float32)}
    raise KeyError(name)


if __name__ == "__main__":
    main(sys.argv[1])
