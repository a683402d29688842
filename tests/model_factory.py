"""Test SavedModels, made with TensorFlow in a child process: ``python tests/model_factory.py DIR``.

- linear/1, linear/2: y = 0.5x + 2 and y = 0.5x + 3 on x float32 [batch]
- mlp/1: x float32 [batch, 8] -> y float32 [batch, 4] (random weights, fixed seed)
- batch_reporter/1: y[i] = x[i] * 0 + (rows in the batch the model ran), after some busy
  work (~10 ms), so tests can see which batches formed and keep the worker busy
- two_io/1: inputs a float32 [batch, 2], b int64 [batch]; outputs sum float32 [batch],
  label_bytes string [batch]
- checked/1: y = 2x on x float32 [batch], failing with InvalidArgument when any x is
  negative: a bad request inside a batch of good ones, with equal shapes
- slow/1: y[i] = x[i] * 0 + (calls of the model so far, this one included), after about
  0.3 s of busy work: a test sees from any answer how many batches the worker has run
  (warm-up included), and so whether a request it gave up on ever reached the model
- typed/1: identity of one input of each dtype TF Serving's JSON knows (f32, f64, i32, i64,
  flag bool, s string, all [batch]); outputs named after the inputs with "_out" (s_bytes
  for the string), for the exact JSON rules both ways
- broken/1: a directory that is not a SavedModel
- versions/N (N = 1..3): y = 0.5x + 10N, so every answer tells which version made it; tests
  copy these into a served base path to swap versions
- warm_good/1: linear with TF Serving's warm-up file (two good PredictionLog records)
- warm_bad/1: linear whose warm-up file asks for an input the model lacks
- text/1, text/2: the text model (workers/demo_models.py) with its lookups in
  assets.extra/lookups.json (a vocabulary with OOV buckets, an embedding keyed by user);
  version 2's words, users and weights differ from version 1's. text_ref/N: the same
  model and tables with the lookups inside the graph (tf.lookup), the reference.
- kinds/1: identity of tag_id int64 [batch], item_vec float32 [batch, 3], shop_vec float32
  [batch, 4] (outputs *_out), looked up from tag (vocabulary tags.txt, default_value -7),
  item (embedding items.npy by row id, on_missing error) and shop (Redis, dim 4; the URL's
  port is REDIS_PORT, which tests replace)
- half_plus_two, half_plus_three, half_plus_two_tf2 (version 123): shaped as TF Serving's own
  test models, TF1 graphs and a TF2 export (tests/tfserving_models.py)
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests.tfserving_models import save_tf_serving_models  # noqa: E402
from workers.demo_models import make_text_tables, save_linear, save_mlp, save_text_model  # noqa: E402


class BatchReporter(tf.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = tf.Variable(tf.ones([256, 256]) * 1e-3)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.float32, name="x")])
    def serve(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
        w = self.w
        for _ in range(12):  # busy work the optimiser cannot fold away (w is a variable)
            w = tf.matmul(w, self.w)
        busy = tf.reduce_sum(w) * 0.0
        rows = tf.cast(tf.shape(x)[0], tf.float32)
        return {"y": x * 0.0 + rows + busy}


class TwoIO(tf.Module):
    @tf.function(input_signature=[tf.TensorSpec([None, 2], tf.float32, name="a"),
                                  tf.TensorSpec([None], tf.int64, name="b")])
    def serve(self, a: tf.Tensor, b: tf.Tensor) -> dict[str, tf.Tensor]:
        total = tf.reduce_sum(a, axis=1) + tf.cast(b, tf.float32)
        return {"sum": total, "label_bytes": tf.strings.as_string(b)}


class Checked(tf.Module):
    @tf.function(input_signature=[tf.TensorSpec([None], tf.float32, name="x")])
    def serve(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
        with tf.control_dependencies([tf.debugging.assert_non_negative(x, message="x must not be negative")]):
            return {"y": x * 2.0}


class Slow(tf.Module):
    def __init__(self, iterations: int) -> None:
        super().__init__()
        self.w = tf.Variable(tf.eye(256) * 0.5)
        self.calls = tf.Variable(0.0)
        self.iterations = iterations

    @tf.function(input_signature=[tf.TensorSpec([None], tf.float32, name="x")])
    def serve(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
        calls = self.calls.assign_add(1.0)
        w = tf.while_loop(lambda i, w: i < self.iterations, lambda i, w: (i + 1, tf.matmul(w, self.w) + self.w),
                          (tf.constant(0), self.w))[1]
        return {"y": x * 0.0 + calls + tf.reduce_sum(w) * 0.0}


class Typed(tf.Module):
    @tf.function(input_signature=[tf.TensorSpec([None], tf.float32, name="f32"),
                                  tf.TensorSpec([None], tf.float64, name="f64"),
                                  tf.TensorSpec([None], tf.int32, name="i32"),
                                  tf.TensorSpec([None], tf.int64, name="i64"),
                                  tf.TensorSpec([None], tf.bool, name="flag"),
                                  tf.TensorSpec([None], tf.string, name="s")])
    def serve(self, f32: tf.Tensor, f64: tf.Tensor, i32: tf.Tensor, i64: tf.Tensor, flag: tf.Tensor,
              s: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"f32_out": tf.identity(f32), "f64_out": tf.identity(f64), "i32_out": tf.identity(i32),
                "i64_out": tf.identity(i64), "flag_out": tf.identity(flag), "s_bytes": tf.identity(s)}


def write_warmup_file(version_dir: str, input_name: str) -> None:
    """TF Serving's assets.extra/tf_serving_warmup_requests: TFRecord of PredictionLog."""
    from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

    os.makedirs(os.path.join(version_dir, "assets.extra"), exist_ok=True)
    with tf.io.TFRecordWriter(os.path.join(version_dir, "assets.extra", "tf_serving_warmup_requests")) as writer:
        for rows in (1, 3):
            request = predict_pb2.PredictRequest()
            request.model_spec.signature_name = "serving_default"
            request.inputs[input_name].CopyFrom(tf.make_tensor_proto([1.0] * rows, dtype=tf.float32))
            entry = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request))
            writer.write(entry.SerializeToString())


class Kinds(tf.Module):
    @tf.function(input_signature=[tf.TensorSpec([None], tf.int64, name="tag_id"),
                                  tf.TensorSpec([None, 3], tf.float32, name="item_vec"),
                                  tf.TensorSpec([None, 4], tf.float32, name="shop_vec")])
    def serve(self, tag_id: tf.Tensor, item_vec: tf.Tensor, shop_vec: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"tag_out": tf.identity(tag_id), "item_out": tf.identity(item_vec), "shop_out": tf.identity(shop_vec)}


def save_kinds(path: str) -> None:
    kinds = Kinds()
    tf.saved_model.save(kinds, path, signatures={"serving_default": kinds.serve})
    extra = os.path.join(path, "assets.extra")
    os.makedirs(extra)
    with open(os.path.join(extra, "tags.txt"), "w") as f:
        f.write("news\nsport\nweather\n")
    np.save(os.path.join(extra, "items.npy"), np.arange(30, dtype=np.float32).reshape(10, 3))
    lookups = [{"input": "tag", "output": "tag_id", "vocabulary": "tags.txt", "default_value": -7},
               {"input": "item", "output": "item_vec", "embedding": "items.npy", "on_missing": "error"},
               {"input": "shop", "output": "shop_vec", "redis": "redis://127.0.0.1:REDIS_PORT/0", "key_prefix": "shop:",
                "dim": 4}]
    with open(os.path.join(extra, "lookups.json"), "w") as f:
        json.dump({"lookups": lookups}, f)


def main(directory: str) -> None:
    save_linear(os.path.join(directory, "linear", "1"), a=0.5, b=2.0)
    save_linear(os.path.join(directory, "linear", "2"), a=0.5, b=3.0)
    save_mlp(os.path.join(directory, "mlp", "1"), input_dim=8, hidden=32, layers=2, outputs=4, seed=7)
    reporter = BatchReporter()
    tf.saved_model.save(reporter, os.path.join(directory, "batch_reporter", "1"),
                        signatures={"serving_default": reporter.serve})
    two = TwoIO()
    tf.saved_model.save(two, os.path.join(directory, "two_io", "1"), signatures={"serving_default": two.serve})
    checked = Checked()
    tf.saved_model.save(checked, os.path.join(directory, "checked", "1"),
                        signatures={"serving_default": checked.serve})
    typed = Typed()
    tf.saved_model.save(typed, os.path.join(directory, "typed", "1"), signatures={"serving_default": typed.serve})
    slow = Slow(iterations=int(os.environ.get("SLOW_ITERATIONS", "1000")))
    tf.saved_model.save(slow, os.path.join(directory, "slow", "1"), signatures={"serving_default": slow.serve})
    for version in (1, 2, 3):
        save_linear(os.path.join(directory, "versions", str(version)), a=0.5, b=10.0 * version)
    save_linear(os.path.join(directory, "warm_good", "1"))
    write_warmup_file(os.path.join(directory, "warm_good", "1"), "x")
    save_linear(os.path.join(directory, "warm_bad", "1"))
    write_warmup_file(os.path.join(directory, "warm_bad", "1"), "not_an_input")
    for version in (1, 2):
        tables = make_text_tables(vocab_size=300, users=50, dim=8, num_oov_buckets=3, version=version)
        save_text_model(os.path.join(directory, "text", str(version)), tables)
        save_text_model(os.path.join(directory, "text_ref", str(version)), tables, lookups_inside=True)
    save_kinds(os.path.join(directory, "kinds", "1"))
    save_tf_serving_models(directory)
    os.makedirs(os.path.join(directory, "broken", "1"), exist_ok=True)
    with open(os.path.join(directory, "broken", "1", "saved_model.pb"), "wb") as fh:
        fh.write(b"this is not a protobuf")


if __name__ == "__main__":
    main(sys.argv[1])
