"""iobatcher/farmhash.py against TensorFlow's own Fingerprint64 buckets (TensorFlow runs in a child)."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import msgpack

from iobatcher.farmhash import fingerprint64
from tests.conftest import ROOT


def test_fingerprint64_matches_tensorflow_for_every_length_class(tmp_path: Path) -> None:
    rnd = random.Random(3)
    # 0-16, 17-32, 33-64 and the long loop (one and several 64-byte blocks), random bytes and UTF-8.
    strings = [bytes(rnd.randrange(256) for _ in range(n)) for n in [*range(0, 140), 191, 192, 193, 1000]]
    strings += ["naïve".encode(), "日本語のテキスト".encode(), b"word"]
    counts = [(1 << 63) - 1, 1_000_003, 3]
    source, target = tmp_path / "in.msgpack", tmp_path / "out.msgpack"
    source.write_bytes(msgpack.packb([strings, counts]))
    subprocess.run([sys.executable, str(ROOT / "tests" / "system" / "fingerprints.py"), str(source), str(target)],
                   check=True, capture_output=True, timeout=120)
    expected = msgpack.unpackb(target.read_bytes())["buckets"]
    for count, want in zip(counts, expected):
        got = [fingerprint64(s) % count for s in strings]
        wrong = [len(s) for s, a, b in zip(strings, got, want) if a != b]
        assert not wrong, f"buckets of {count}: wrong for strings of lengths {wrong[:10]}"
