"""The I/O batcher's tables and its batch step, in-process: no TensorFlow here (the Fingerprint64
check against TensorFlow is tests/system/test_farmhash.py)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tfbroker.wire import protocol, tensors
from iobatcher.batcher import IoBatcher
from tfbroker.runtime.settings import IoBatcherConfig
from iobatcher.farmhash import fingerprint64
from iobatcher.tables import TableError, load_tables


def declare(version: Path, lookups: list[dict[str, Any]], files: dict[str, Any] | None = None) -> Path:
    extra = version / "assets.extra"
    extra.mkdir(parents=True, exist_ok=True)
    for name, content in (files or {}).items():
        if isinstance(content, np.ndarray):
            np.save(extra / name, content)
        else:
            (extra / name).write_text(content)
    (extra / "lookups.json").write_text(json.dumps({"lookups": lookups}))
    return version


def test_vocabulary_ids_are_line_numbers_and_unknown_tokens_get_the_default_or_a_bucket(tmp_path: Path) -> None:
    version = declare(tmp_path / "1", [
        {"input": "w", "output": "w_ids", "vocabulary": "v.txt", "num_oov_buckets": 5},
        {"input": "t", "output": "t_ids", "vocabulary": "v.txt", "default_value": -3}],
        {"v.txt": "the\ncat\n\nsat on\n"})
    with_buckets, with_default = load_tables(str(version))
    keys = np.array([b"cat", b"sat on", b"", b"dog", b"the"], dtype=object)
    ids, missing = with_buckets.lookup(keys)
    assert ids.tolist() == [1, 3, 2, 4 + fingerprint64(b"dog") % 5, 0]  # an empty line is a token too
    assert not missing.any()
    ids, missing = with_default.lookup(keys)
    assert ids.tolist() == [1, 3, 2, -3, 0] and missing.tolist() == [False, False, False, True, False]
    assert with_buckets.spec == protocol.LookupSpec("w", "string", "w_ids", "int64", 0)


def test_an_embedding_is_memory_mapped_and_loading_it_reads_no_rows(tmp_path: Path) -> None:
    extra = tmp_path / "1" / "assets.extra"
    extra.mkdir(parents=True)
    rows, dim = 1 << 20, 64  # 256 MiB: far more than loading may touch
    matrix = np.lib.format.open_memmap(extra / "big.npy", mode="w+", dtype=np.float32, shape=(rows, dim))
    matrix[12345] = 1.5
    matrix[rows - 1] = -2.0
    matrix.flush()
    del matrix
    declare(tmp_path / "1", [{"input": "id", "output": "vec", "embedding": "big.npy"}])
    before = resident_bytes()
    (table,) = load_tables(str(tmp_path / "1"))
    values, missing = table.lookup(np.array([12345, rows - 1, rows, -1], dtype=np.int64))
    grown = resident_bytes() - before
    assert grown < 32 << 20, f"loading and looking up grew the process by {grown >> 20} MiB"
    assert values[0].tolist() == [1.5] * dim and values[1].tolist() == [-2.0] * dim
    assert not values[2:].any() and missing.tolist() == [False, False, True, True]  # out of range: zeros
    table.close()


def resident_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.parametrize("lookups, files, message", [
    ([{"input": "a", "output": "b", "vocabulary": "missing.txt"}], {}, "missing.txt does not exist"),
    ([{"input": "a", "output": "b", "embedding": "m.npy"}], {"m.npy": np.zeros((3, 2), np.float64)},
     "an embedding is float32 [N, D]"),
    ([{"input": "a", "output": "b", "embedding": "m.npy"}], {"m.npy": np.zeros(3, np.float32)},
     "an embedding is float32 [N, D]"),
    ([{"input": "a", "output": "b", "vocabulary": "v.txt", "embedding": "m.npy"}], {"v.txt": "x\n"},
     "exactly one of"),
    ([{"input": "a", "output": "b", "vocabulary": "v.txt", "colour": 1}], {"v.txt": "x\n"}, "unknown fields"),
    ([{"input": "a", "output": "b", "vocabulary": "v.txt", "on_missing": "guess"}], {"v.txt": "x\n"}, "on_missing"),
    ([{"input": "a", "output": "b", "redis": "http://x", "dim": 4}], {}, "redis:// URL"),
    ([{"input": "a", "output": "b", "vocabulary": "v.txt"}, {"input": "a", "output": "c", "vocabulary": "v.txt"}],
     {"v.txt": "x\n"}, "declared twice"),
    ([{"input": "a", "output": "b", "embedding": "m.npy", "keys": "k.txt"}],
     {"m.npy": np.zeros((1, 2), np.float32), "k.txt": "x\ny\n"}, "2 keys for 1 rows"),
])
def test_a_bad_declaration_or_table_names_what_is_wrong(tmp_path: Path, lookups: list[dict[str, Any]],
                                                        files: dict[str, Any], message: str) -> None:
    declare(tmp_path / "1", lookups, files)
    with pytest.raises(TableError, match=re.escape(message)):
        load_tables(str(tmp_path / "1"))


def test_a_truncated_npy_and_a_broken_json_fail_the_load(tmp_path: Path) -> None:
    declare(tmp_path / "1", [{"input": "a", "output": "b", "embedding": "m.npy"}],
            {"m.npy": np.zeros((100, 8), np.float32)})
    npy = tmp_path / "1" / "assets.extra" / "m.npy"
    npy.write_bytes(npy.read_bytes()[:300])
    with pytest.raises(TableError, match="not a readable .npy"):
        load_tables(str(tmp_path / "1"))
    (tmp_path / "1" / "assets.extra" / "lookups.json").write_text("{not json")
    with pytest.raises(TableError, match="cannot read"):
        load_tables(str(tmp_path / "1"))


def run_batch(batcher: IoBatcher, tasks: list[dict[str, np.ndarray]],
              timeouts_ms: list[int] | None = None) -> tuple[protocol.LookupResult, list[dict[str, np.ndarray]]]:
    """One LookupBatch through the batcher's step; the result and each task's outputs."""
    counts, specs, frames = [], [], []
    for inputs in tasks:
        task_specs, task_frames = tensors.encode_tensors(inputs)
        counts.append(len(task_specs))
        specs += task_specs
        frames += task_frames
    sent: list[tuple[Any, Any]] = []
    batcher._send = lambda command, header, frames=(): sent.append((header, list(frames)))  # type: ignore[method-assign]
    header = protocol.LookupBatch(batch=1, model="m", version=1, counts=counts,
                                  timeouts_ms=timeouts_ms or [1000] * len(tasks), inputs=specs)
    batcher._run_batch(header, frames, time.monotonic())
    ((result, out),) = sent
    outputs, offset = [], 0
    for count in result.counts:
        outputs.append(tensors.decode_tensors(result.outputs[offset:offset + count], out[offset:offset + count]))
        offset += count
    return result, outputs


def test_a_batch_looks_up_each_distinct_key_once_and_a_missing_key_fails_only_its_task(tmp_path: Path) -> None:
    version = declare(tmp_path / "1", [
        {"input": "w", "output": "w_ids", "vocabulary": "v.txt", "num_oov_buckets": 2},
        {"input": "u", "output": "u_vec", "embedding": "u.npy", "keys": "u.txt", "on_missing": "error"}],
        {"v.txt": "a\nb\nc\n", "u.txt": "x\ny\n", "u.npy": np.array([[1, 2], [3, 4]], np.float32)})
    batcher = IoBatcher(IoBatcherConfig(index=0, backend_address="ipc:///nowhere"))
    batcher.tables[("m", 1)] = load_tables(str(version))
    words = np.array([["a", "b"], ["c", "a"]], dtype=object)
    tasks = [{"w": words, "u": np.array(["x", "y"], dtype=object)},
             {"w": np.array([["b", "zz"]], dtype=object), "u": np.array(["nobody"], dtype=object)},
             {"w": np.array([["c"]], dtype=object), "u": np.array(["y"], dtype=object)}]
    result, outputs = run_batch(batcher, tasks)
    assert result.keys == 4 + 2 + 1 + 2 + 1 + 1  # words then users, all tasks
    assert result.unique_keys == 4 + 3  # a b c zz; x y nobody
    assert outputs[0]["w_ids"].tolist() == [[0, 1], [2, 0]]
    assert outputs[0]["u_vec"].tolist() == [[1, 2], [3, 4]]
    assert outputs[1] == {} and [(f.task, f.code) for f in result.failures] == [(1, 400)]
    assert "nobody" in result.failures[0].message
    assert outputs[2]["w_ids"].tolist() == [[2]] and outputs[2]["u_vec"].tolist() == [[3, 4]]


def test_tasks_out_of_time_and_versions_without_tables_are_answered_not_run(tmp_path: Path) -> None:
    version = declare(tmp_path / "1", [{"input": "w", "output": "ids", "vocabulary": "v.txt"}], {"v.txt": "a\n"})
    batcher = IoBatcher(IoBatcherConfig(index=0, backend_address="ipc:///nowhere"))
    result, _ = run_batch(batcher, [{"w": np.array(["a"], dtype=object)}])
    assert [(f.code, "holds no tables" in f.message) for f in result.failures] == [(503, True)]
    batcher.tables[("m", 1)] = load_tables(str(version))
    result, outputs = run_batch(batcher, [{"w": np.array(["a"], dtype=object)}] * 2, timeouts_ms=[1000, 0])
    assert outputs[0]["ids"].tolist() == [0] and [(f.task, f.code) for f in result.failures] == [(1, 504)]
    result, _ = run_batch(batcher, [{"w": np.array([1.5], np.float32)}])  # a string table given floats
    assert [f.code for f in result.failures] == [400]


def test_tables_load_beside_the_loop_and_loaded_follows_when_they_are_in(tmp_path: Path) -> None:
    good = declare(tmp_path / "1", [{"input": "w", "output": "ids", "vocabulary": "v.txt"}], {"v.txt": "a\nb\n"})
    bad = declare(tmp_path / "2", [{"input": "w", "output": "ids", "vocabulary": "gone.txt"}])
    batcher = IoBatcher(IoBatcherConfig(index=0, backend_address="ipc:///nowhere"))
    sent: list[Any] = []
    batcher._send = lambda command, header, frames=(): sent.append(header)  # type: ignore[method-assign]
    batcher._load(protocol.Tables(model="m", version=1, path=str(good)))
    batcher._load(protocol.Tables(model="m", version=2, path=str(bad)))
    deadline = time.monotonic() + 10
    while batcher._loading and time.monotonic() < deadline:  # the loop's own check, as it runs it
        batcher._finish_loads()
        time.sleep(0.01)
    loaded = {header.version: header for header in sent}
    assert loaded[1].lookups == [protocol.LookupSpec("w", "string", "ids", "int64", 0)] and not loaded[1].error
    assert "gone.txt does not exist" in loaded[2].error and ("m", 2) not in batcher.tables
    # A version unloaded while its load is still running never reports, and its tables are closed.
    batcher._load(protocol.Tables(model="m", version=3, path=str(good)))
    batcher._drop(("m", 3))
    time.sleep(0.2)
    batcher._finish_loads()
    assert 3 not in {header.version for header in sent} and ("m", 3) not in batcher.tables
    batcher._loader.shutdown()
