"""SavedModels shaped as TF Serving's own test models, made here so no test needs files from
outside the repository (imported by tests/model_factory.py, in a child with TensorFlow).

- ``half_plus_two``: a TF1 graph (the v1 loader's path, as TF Serving's C++ loader) with the
  signatures of TF Serving's saved_model_half_plus_two: serving_default (predict, x [-1,1]
  -> y = 0.5x + 2), classify_x_to_y and regress_x_to_y (serialized tf.Examples with a float
  feature x), regress_x_to_y2 (0.5x + 3) and regress_x2_to_y3 (a tensor x2 -> 0.5x2 + 3).
- ``half_plus_three``: a TF1 graph whose predict input has no recorded shape (y = 0.5x + 3)
  and whose regression signature is named ``tensorflow/serving/regress``, as TF Serving's
  TF 1.0 export.
- ``half_plus_two_tf2``: a ``tf.saved_model.save`` export, where every signature is marked
  "predict": serving_default x [1], and the example-taking signatures on string [-1].
- ``tagged/1``: y = 0.5x + 2 in a MetaGraph tagged "serve" and "gpu" (--saved_model_tags).

Each in version directory 00000123, as TF Serving's.
"""

from __future__ import annotations

import os

import tensorflow as tf

VERSION_DIR = "00000123"

v1 = tf.compat.v1


def _info(tensor: tf.Tensor) -> object:
    return v1.saved_model.utils.build_tensor_info(tensor)


def _signature(inputs: dict[str, tf.Tensor], outputs: dict[str, tf.Tensor], method: str) -> object:
    return v1.saved_model.signature_def_utils.build_signature_def(
        inputs={k: _info(v) for k, v in inputs.items()}, outputs={k: _info(v) for k, v in outputs.items()},
        method_name=method)


def save_half_plus_two(path: str) -> None:
    constants = v1.saved_model.signature_constants
    with tf.Graph().as_default():
        serialized = v1.placeholder(tf.string, name="tf_example")
        features = v1.parse_example(serialized, {
            "x": v1.FixedLenFeature([1], dtype=tf.float32),
            "x2": v1.FixedLenFeature([1], dtype=tf.float32, default_value=[0.0])})
        a = v1.Variable(0.5, name="a")
        b = v1.Variable(2.0, name="b")
        c = v1.Variable(3.0, name="c")
        # TF 1.14 gave parse_example's outputs the shape [-1, 1] that TF Serving's metadata shows.
        x = tf.identity(tf.ensure_shape(features["x"], [None, 1]), name="x")
        x2 = tf.identity(tf.ensure_shape(features["x2"], [None, 1]), name="x2")
        y = tf.add(tf.multiply(a, x), b, name="y")
        y2 = tf.add(tf.multiply(a, x), c, name="y2")
        y3 = tf.add(tf.multiply(a, x2), c, name="y3")
        signatures = {
            "serving_default": _signature({"x": x}, {"y": y}, constants.PREDICT_METHOD_NAME),
            "classify_x_to_y": _signature({"inputs": serialized}, {"scores": y}, constants.CLASSIFY_METHOD_NAME),
            "regress_x_to_y": _signature({"inputs": serialized}, {"outputs": y}, constants.REGRESS_METHOD_NAME),
            "regress_x_to_y2": _signature({"inputs": serialized}, {"outputs": y2}, constants.REGRESS_METHOD_NAME),
            "regress_x2_to_y3": _signature({"inputs": x2}, {"outputs": y3}, constants.REGRESS_METHOD_NAME),
        }
        _save(path, signatures)


def save_half_plus_three(path: str) -> None:
    constants = v1.saved_model.signature_constants
    with tf.Graph().as_default():
        serialized = v1.placeholder(tf.string, name="tf_example")
        features = v1.parse_example(serialized, {"x": v1.FixedLenFeature([1], dtype=tf.float32)})
        a = v1.Variable(0.5, name="a")
        c = v1.Variable(3.0, name="c")
        x_example = features["x"]
        x = v1.placeholder_with_default(tf.reshape(x_example, [-1]), shape=None, name="x")
        y = tf.add(tf.multiply(a, x), c, name="y")
        regressed = tf.identity(tf.add(tf.multiply(a, x_example), c))
        signatures = {
            "serving_default": _signature({"x": x}, {"y": y}, constants.PREDICT_METHOD_NAME),
            constants.REGRESS_METHOD_NAME: _signature({"inputs": serialized}, {"outputs": regressed},
                                                      constants.REGRESS_METHOD_NAME),
        }
        _save(path, signatures)


def save_half_plus_two_tagged(path: str) -> None:
    """half_plus_two's predict signature in a MetaGraph tagged serve and gpu only
    (loaded with --saved_model_tags=serve,gpu)."""
    with tf.Graph().as_default():
        x = v1.placeholder(tf.float32, [None], name="x")
        y = tf.add(tf.multiply(v1.Variable(0.5, name="a"), x), v1.Variable(2.0, name="b"), name="y")
        signature = _signature({"x": x}, {"y": y}, v1.saved_model.signature_constants.PREDICT_METHOD_NAME)
        _save(path, {"serving_default": signature}, tags=["serve", "gpu"])


def _save(path: str, signatures: dict[str, object], tags: list[str] | None = None) -> None:
    with v1.Session() as session:
        session.run(v1.global_variables_initializer())
        builder = v1.saved_model.builder.SavedModelBuilder(path)
        builder.add_meta_graph_and_variables(session, tags or [v1.saved_model.tag_constants.SERVING],
                                             signature_def_map=signatures)
        builder.save()


class HalfPlusTwoTf2(tf.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = tf.Variable(0.5)
        self.b = tf.Variable(2.0)
        self.c = tf.Variable(3.0)

    @tf.function(input_signature=[tf.TensorSpec([1], tf.float32, name="x")])
    def predict(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"y": self.a * x + self.b}

    def _parse(self, serialized: tf.Tensor) -> tf.Tensor:
        return tf.io.parse_example(serialized, {"x": tf.io.FixedLenFeature([1], tf.float32)})["x"]

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
    def classify_x_to_y(self, inputs: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"scores": self.a * self._parse(inputs) + self.b}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
    def regress_x_to_y(self, inputs: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"outputs": self.a * self._parse(inputs) + self.b}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
    def regress_x_to_y2(self, inputs: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"outputs": self.a * self._parse(inputs) + self.c}


def save_half_plus_two_tf2(path: str) -> None:
    module = HalfPlusTwoTf2()
    tf.saved_model.save(module, path, signatures={
        "serving_default": module.predict, "classify_x_to_y": module.classify_x_to_y,
        "regress_x_to_y": module.regress_x_to_y, "regress_x_to_y2": module.regress_x_to_y2})


def save_tf_serving_models(directory: str) -> None:
    save_half_plus_two(os.path.join(directory, "half_plus_two", VERSION_DIR))
    save_half_plus_three(os.path.join(directory, "half_plus_three", VERSION_DIR))
    save_half_plus_two_tf2(os.path.join(directory, "half_plus_two_tf2", VERSION_DIR))
    save_half_plus_two_tagged(os.path.join(directory, "tagged", "1"))
