"""SavedModels made on the spot with TensorFlow, in TF Serving's ``BASE/VERSION`` layout.

Used by ``python -m broker`` with no model flags (the demo), by the tests and by bench/.
``python -m workers.demo_models DIR`` writes DIR/half_plus_two/1, DIR/mlp/1 and DIR/text/1
(a text model whose vocabulary and embedding lookups run in the I/O batcher).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass

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


@dataclass(frozen=True)
class TextTables:
    """The lookup tables and weights of the text model (``save_text_model``)."""

    vocab: list[str]  # line i of vocab.txt has id i
    num_oov_buckets: int
    users: list[str]  # line i of users.txt is row i of users.npy
    user_vectors: np.ndarray  # float32 [users, dim]
    word_weights: np.ndarray  # float32 [vocab + oov buckets]: a score per word id
    user_weights: np.ndarray  # float32 [dim]


def make_text_tables(*, vocab_size: int = 1000, users: int = 200, dim: int = 16, num_oov_buckets: int = 4,
                     seed: int = 0, version: int = 1) -> TextTables:
    """Random tables; another ``version`` has other words, users and weights."""
    rng = np.random.default_rng(seed * 1000 + version)
    return TextTables(
        vocab=[f"w{version}_{i}" if i % 3 else f"word{i}" for i in range(vocab_size)],
        num_oov_buckets=num_oov_buckets,
        users=[f"u{i}" for i in range(0, users * 2, 2)] if version % 2 else [f"u{i}" for i in range(users)],
        user_vectors=rng.standard_normal((users, dim)).astype(np.float32),
        word_weights=rng.standard_normal(vocab_size + num_oov_buckets).astype(np.float32),
        user_weights=rng.standard_normal(dim).astype(np.float32))


def save_text_model(path: str, tables: TextTables, *, lookups_inside: bool = False) -> None:
    """score = mean over words of word_weights[id(word)] + user_vec(user) . user_weights,
    with ``oov``: how many words fell in an OOV bucket.

    By default the SavedModel takes the looked-up tensors (word_ids int64 [batch, words],
    user_vec float32 [batch, dim]) and ships its tables with ``assets.extra/lookups.json``,
    so clients send words and user ids and the I/O batcher looks them up. With
    ``lookups_inside`` the same lookups run in the graph (tf.lookup + tf.nn.embedding_lookup,
    the user table a variable in the worker's memory): the reference for both."""
    vocab_size, dim = len(tables.vocab), tables.user_vectors.shape[1]
    word_weights, user_weights = tables.word_weights, tables.user_weights

    def score(word_ids: tf.Tensor, user_vec: tf.Tensor) -> dict[str, tf.Tensor]:
        words = tf.reduce_mean(tf.gather(tf.constant(word_weights), word_ids), axis=1)
        users = tf.linalg.matvec(user_vec, tf.constant(user_weights))
        return {"score": words + users, "oov": tf.reduce_sum(tf.cast(word_ids >= vocab_size, tf.int64), axis=1)}

    if lookups_inside:
        with tempfile.TemporaryDirectory() as scratch:
            vocab_file = os.path.join(scratch, "vocab.txt")
            with open(vocab_file, "w", encoding="utf-8") as f:
                f.write("".join(f"{w}\n" for w in tables.vocab))

            class Inside(tf.Module):
                def __init__(self) -> None:
                    super().__init__()
                    self.vocab = tf.lookup.StaticVocabularyTable(
                        tf.lookup.TextFileInitializer(vocab_file, tf.string, tf.lookup.TextFileIndex.WHOLE_LINE,
                                                      tf.int64, tf.lookup.TextFileIndex.LINE_NUMBER),
                        num_oov_buckets=tables.num_oov_buckets)
                    self.users = tf.lookup.StaticHashTable(
                        tf.lookup.KeyValueTensorInitializer(tf.constant(tables.users),
                                                            tf.range(len(tables.users), dtype=tf.int64)), -1)
                    self.user_table = tf.Variable(tables.user_vectors)

                @tf.function(input_signature=[tf.TensorSpec([None, None], tf.string, name="words"),
                                              tf.TensorSpec([None], tf.string, name="user")])
                def serve(self, words: tf.Tensor, user: tf.Tensor) -> dict[str, tf.Tensor]:
                    rows = self.users.lookup(user)
                    vec = tf.nn.embedding_lookup(self.user_table, tf.maximum(rows, 0))
                    vec = tf.where(rows[:, None] >= 0, vec, tf.zeros_like(vec))  # unknown user: zeros
                    return score(self.vocab.lookup(words), vec)

            module = Inside()
            tf.saved_model.save(module, path, signatures={"serving_default": module.serve})
        return

    class Outside(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, None], tf.int64, name="word_ids"),
                                      tf.TensorSpec([None, dim], tf.float32, name="user_vec")])
        def serve(self, word_ids: tf.Tensor, user_vec: tf.Tensor) -> dict[str, tf.Tensor]:
            return score(word_ids, user_vec)

    module = Outside()
    tf.saved_model.save(module, path, signatures={"serving_default": module.serve})
    write_text_lookups(path, tables)


def write_text_lookups(path: str, tables: TextTables) -> None:
    """The text model's tables and ``assets.extra/lookups.json`` in version directory ``path``."""
    extra = os.path.join(path, "assets.extra")
    os.makedirs(extra, exist_ok=True)
    with open(os.path.join(extra, "vocab.txt"), "w", encoding="utf-8") as f:
        f.write("".join(f"{w}\n" for w in tables.vocab))
    with open(os.path.join(extra, "users.txt"), "w", encoding="utf-8") as f:
        f.write("".join(f"{u}\n" for u in tables.users))
    np.save(os.path.join(extra, "users.npy"), tables.user_vectors)
    lookups = [{"input": "words", "output": "word_ids", "vocabulary": "vocab.txt",
                "num_oov_buckets": tables.num_oov_buckets},
               {"input": "user", "output": "user_vec", "embedding": "users.npy", "keys": "users.txt"}]
    with open(os.path.join(extra, "lookups.json"), "w", encoding="utf-8") as f:
        json.dump({"lookups": lookups}, f, indent=1)


def make_demo_models(directory: str) -> None:
    """Each model is written beside its place and renamed into it, so an interrupted run
    never leaves a half-written model that a later run would take for a finished one."""
    builders = {
        "half_plus_two": lambda path: save_linear(path),
        "mlp": lambda path: save_mlp(path, input_dim=16, hidden=64, layers=2, outputs=4),
        "text": lambda path: save_text_model(path, make_text_tables()),
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
