"""A version's lookup tables, as ``VERSION/assets.extra/lookups.json`` declares them.

    {"lookups": [
      {"input": "words", "output": "word_ids", "vocabulary": "vocab.txt", "num_oov_buckets": 2},
      {"input": "tags",  "output": "tag_ids",  "vocabulary": "tags.txt",  "default_value": -1},
      {"input": "user",  "output": "user_vec", "embedding": "users.npy", "keys": "users.txt"},
      {"input": "item",  "output": "item_vec", "embedding": "items.npy"},
      {"input": "shop",  "output": "shop_vec", "redis": "redis://127.0.0.1:6379/0", "key_prefix": "shop:",
       "dim": 8}
    ]}

Paths are relative to ``assets.extra/``. Every table answers ``lookup(keys)`` for the distinct
keys of a whole batch at once, with a mask of the keys it does not hold:

- vocabulary: line i of the file (0-based, the whole line) has id i, as TensorFlow's
  TextFileInitializer (WHOLE_LINE, LINE_NUMBER); an unknown token gets ``default_value``
  (StaticHashTable, default -1) or, with ``num_oov_buckets``, ``vocab_size +
  Fingerprint64(token) % num_oov_buckets`` (StaticVocabularyTable). int64.
- embedding: a float32 ``.npy`` matrix [N, D], memory-mapped (loading reads its header only;
  a batch touches only the rows it needs, shared between I/O batchers by the page cache).
  With ``keys`` (line i is row i) keys are strings, else integer row ids. float32 [..., D].
- redis: D little-endian float32s at ``key_prefix + key``, one MGET per batch.

A missing key (unknown key, id out of range, absent Redis key) gets a row of zeros, or, with
``"on_missing": "error"``, fails its request with 400 naming the key.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable

import numpy as np

from tfbroker.wire.errors import InvalidArgument, Unavailable
from tfbroker.wire.protocol import LookupSpec
from iobatcher.farmhash import fingerprint64

LOOKUPS_FILE = os.path.join("assets.extra", "lookups.json")
_KINDS = ("vocabulary", "embedding", "redis")
_FIELDS = {"input", "output", "on_missing", *_KINDS, "num_oov_buckets", "default_value", "keys", "key_prefix",
           "dim"}


class TableError(ValueError):
    """A declaration or a table file that cannot be used: the version fails to load."""


class Table:
    """One declared lookup."""

    def __init__(self, spec: LookupSpec, on_missing: str) -> None:
        self.spec = spec
        self.on_missing = on_missing

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Values for 1-D distinct ``keys`` ([K] int64 or [K, D] float32), and the mask of
        the missing ones."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class Vocabulary(Table):
    def __init__(self, spec: LookupSpec, on_missing: str, path: str, num_oov_buckets: int,
                 default_value: int) -> None:
        super().__init__(spec, on_missing)
        self.ids = _read_keys(path)
        self.num_oov_buckets = num_oov_buckets
        self.default_value = default_value

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids = self.ids
        values = np.fromiter((ids.get(k, -1) for k in keys), dtype=np.int64, count=len(keys))
        missing = values < 0
        if missing.any():
            if self.num_oov_buckets:
                size, buckets = len(ids), self.num_oov_buckets
                values[missing] = [size + fingerprint64(k) % buckets for k in keys[missing]]
                missing[:] = False  # every token has an id
            else:
                values[missing] = self.default_value
        return values, missing


class Embedding(Table):
    def __init__(self, spec: LookupSpec, on_missing: str, matrix: np.ndarray, keys_path: str | None) -> None:
        super().__init__(spec, on_missing)
        self.matrix = matrix
        self.rows = _read_keys(keys_path) if keys_path else None
        if self.rows is not None and len(self.rows) > len(matrix):
            raise TableError(f"{keys_path} has {len(self.rows)} keys for {len(matrix)} rows")

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.rows is not None:
            rows = self.rows
            index = np.fromiter((rows.get(k, -1) for k in keys), dtype=np.int64, count=len(keys))
        else:
            index = keys.astype(np.int64, copy=False)
        missing = (index < 0) | (index >= len(self.matrix))
        values = np.zeros((len(keys), self.matrix.shape[1]), np.float32)
        found = ~missing
        if found.all():
            values[:] = self.matrix[index]  # only these rows are read from the file
        elif found.any():
            values[found] = self.matrix[index[found]]
        return values, missing

    def close(self) -> None:
        mapped = getattr(self.matrix, "_mmap", None)
        self.matrix = np.zeros((0, self.matrix.shape[1]), np.float32)
        if mapped is not None:
            mapped.close()


class RedisTable(Table):
    def __init__(self, spec: LookupSpec, on_missing: str, url: str, key_prefix: str, timeout_ms: int) -> None:
        super().__init__(spec, on_missing)
        import redis  # only I/O batchers with a Redis table need it

        self.url = url
        self.prefix = key_prefix.encode()
        self.errors = (redis.RedisError, OSError)
        # Connecting is lazy: a store that is down at load time fails requests (503), not the version.
        self.client = redis.Redis.from_url(url, socket_timeout=timeout_ms / 1000, socket_connect_timeout=timeout_ms / 1000,
                                           retry_on_timeout=False)

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        dim = self.spec.dim
        prefix = self.prefix
        try:
            found = self.client.mget([prefix + k for k in keys]) if len(keys) else []
        except self.errors as exc:
            raise Unavailable(f"the lookup store {self.url} is unavailable: {exc}") from exc
        values = np.zeros((len(keys), dim), np.float32)
        missing = np.zeros(len(keys), bool)
        for i, raw in enumerate(found):  # bytes: the client does not decode responses
            if raw is None:
                missing[i] = True
            elif len(raw) != 4 * dim:
                raise InvalidArgument(f"{self.url}: the value at {(prefix + keys[i]).decode(errors='replace')!r} holds "
                                      f"{len(raw)} bytes, not {dim} float32s")
            else:
                values[i] = np.frombuffer(raw, "<f4")  # type: ignore[arg-type]
        return values, missing

    def close(self) -> None:
        self.client.close()


def load_tables(version_path: str, redis_timeout_ms: int = 1000) -> list[Table]:
    """Every table ``lookups.json`` declares, ready to use; TableError names what is wrong."""
    declared = os.path.join(version_path, LOOKUPS_FILE)
    try:
        with open(declared, encoding="utf-8") as f:
            document = json.load(f)
    except (OSError, ValueError) as exc:
        raise TableError(f"cannot read {declared}: {exc}") from exc
    entries = document.get("lookups") if isinstance(document, dict) else None
    if not isinstance(entries, list) or not entries:
        raise TableError(f'{declared}: expected {{"lookups": [...]}} with at least one lookup')
    tables: list[Table] = []
    try:
        for i, entry in enumerate(entries):
            tables.append(_table(entry, os.path.dirname(declared), f"{declared}, lookup {i}", redis_timeout_ms))
        _check_names(tables, declared)
    except BaseException:
        for table in tables:
            table.close()
        raise
    return tables


# --- implementation ---

def _table(entry: Any, base: str, where: str, redis_timeout_ms: int) -> Table:
    if not isinstance(entry, dict):
        raise TableError(f"{where}: a lookup is a JSON object")
    unknown = set(entry) - _FIELDS
    if unknown:
        raise TableError(f"{where}: unknown fields {sorted(unknown)}")
    kinds = [k for k in _KINDS if k in entry]
    if len(kinds) != 1:
        raise TableError(f"{where}: give exactly one of {', '.join(_KINDS)}")
    kind = kinds[0]
    name_in, name_out = entry.get("input"), entry.get("output")
    if not (isinstance(name_in, str) and name_in and isinstance(name_out, str) and name_out):
        raise TableError(f"{where}: 'input' and 'output' must be non-empty strings")
    on_missing = entry.get("on_missing", "zeros")
    if on_missing not in ("zeros", "error"):
        raise TableError(f"{where}: on_missing must be 'zeros' or 'error', got {on_missing!r}")
    if kind == "vocabulary":
        buckets = _int(entry, "num_oov_buckets", 0, where)
        default = _int(entry, "default_value", -1, where, minimum=None)
        if buckets < 0:
            raise TableError(f"{where}: num_oov_buckets must be >= 0")
        spec = LookupSpec(name_in, "string", name_out, "int64", 0)
        table: Table = Vocabulary(spec, "zeros" if buckets else on_missing, _file(base, entry[kind], where),
                                  buckets, default)
        if not table.ids:  # type: ignore[attr-defined]
            raise TableError(f"{where}: {entry[kind]} is empty")
        return table
    if kind == "embedding":
        matrix = _matrix(_file(base, entry[kind], where), where)
        keys = _file(base, entry["keys"], where) if "keys" in entry else None
        spec = LookupSpec(name_in, "string" if keys else "int64", name_out, "float32", int(matrix.shape[1]))
        return Embedding(spec, on_missing, matrix, keys)
    dim = _int(entry, "dim", 0, where)
    url = entry[kind]
    if dim < 1 or not isinstance(url, str) or not url.startswith(("redis://", "rediss://", "unix://")):
        raise TableError(f"{where}: redis needs a redis:// URL and 'dim' >= 1")
    prefix = entry.get("key_prefix", "")
    if not isinstance(prefix, str):
        raise TableError(f"{where}: key_prefix must be a string")
    return RedisTable(LookupSpec(name_in, "string", name_out, "float32", dim), on_missing, url, prefix,
                      redis_timeout_ms)


def _check_names(tables: Iterable[Table], declared: str) -> None:
    inputs, outputs = set(), set()
    for table in tables:
        if table.spec.input in inputs or table.spec.output in outputs:
            raise TableError(f"{declared}: input {table.spec.input!r} or output {table.spec.output!r} is declared "
                             "twice")
        inputs.add(table.spec.input)
        outputs.add(table.spec.output)


def _int(entry: dict[str, Any], name: str, default: int, where: str, minimum: int | None = 0) -> int:
    value = entry.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or (minimum is not None and value < minimum):
        raise TableError(f"{where}: {name} must be an integer" + (f" >= {minimum}" if minimum is not None else ""))
    return value


def _file(base: str, name: Any, where: str) -> str:
    if not isinstance(name, str) or not name:
        raise TableError(f"{where}: a table file name must be a non-empty string")
    path = os.path.normpath(os.path.join(base, name))
    if not os.path.isfile(path):
        raise TableError(f"{where}: {path} does not exist")
    return path


def _matrix(path: str, where: str) -> np.ndarray:
    try:
        matrix = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise TableError(f"{where}: {path} is not a readable .npy matrix: {exc}") from exc
    if matrix.dtype != np.float32 or matrix.ndim != 2 or matrix.shape[1] < 1:
        raise TableError(f"{where}: {path} holds {matrix.dtype}{list(matrix.shape)}; an embedding is float32 [N, D]")
    return matrix


def _read_keys(path: str) -> dict[bytes, int]:
    """Line i (0-based, the whole line without its newline) -> i; the first of equal lines wins."""
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the file's last newline ends a line, it does not start one
    ids: dict[bytes, int] = {}
    for i, line in enumerate(lines):
        ids.setdefault(line, i)
    return ids
