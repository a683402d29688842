"""TensorFlow's bucket of each string, computed in a child: ``python tests/system/fingerprints.py IN OUT``.

IN holds msgpack [strings, bucket counts]; OUT gets msgpack {buckets: [[bucket of each string]…]}
from tf.strings.to_hash_bucket_fast (Fingerprint64 % buckets), the hash StaticVocabularyTable uses.
"""

from __future__ import annotations

import sys

import msgpack
import tensorflow as tf


def main(source: str, target: str) -> None:
    with open(source, "rb") as f:
        strings, bucket_counts = msgpack.unpackb(f.read())
    buckets = [tf.strings.to_hash_bucket_fast(tf.constant(strings, tf.string), n).numpy().tolist()
               for n in bucket_counts]
    with open(target, "wb") as f:
        f.write(msgpack.packb({"buckets": buckets}))


if __name__ == "__main__":
    main(*sys.argv[1:])
