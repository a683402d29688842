"""The request logs' TFRecord files (frontend/request_log.py), without processes."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import google_crc32c

from frontend.request_log import TFRecordFile, _masked_crc


def read_records(path: Path) -> list[bytes]:
    """TensorFlow's TFRecord framing, checked: length, its masked CRC, data, its masked CRC."""
    data, records, offset = path.read_bytes(), [], 0
    while offset < len(data):
        (length,) = struct.unpack_from("<Q", data, offset)
        assert struct.unpack_from("<I", data, offset + 8)[0] == _masked_crc(data[offset:offset + 8])
        record = data[offset + 12:offset + 12 + length]
        assert struct.unpack_from("<I", data, offset + 12 + length)[0] == _masked_crc(record)
        records.append(record)
        offset += 16 + length
    return records


def test_the_checksum_is_crc32c_masked_as_tensorflow_masks_it() -> None:
    assert google_crc32c.value(b"123456789") == 0xE3069283  # CRC-32C's check value
    crc = 0xE3069283
    assert _masked_crc(b"123456789") == ((crc >> 15 | crc << 17) + 0xA282EAD8) & 0xFFFFFFFF


def test_files_rotate_once_past_their_size_and_hold_whole_records(tmp_path: Path) -> None:
    writer = TFRecordFile(str(tmp_path / "logs" / "model"), max_bytes=100)
    for i in range(5):
        writer.append(bytes([i]) * 40)  # 56 bytes framed: two records pass 100 bytes
    writer.close()
    files = sorted((tmp_path / "logs").glob("model-*.tfrecord"))
    assert [len(read_records(f)) for f in files] == [2, 2, 1]
    assert [r for f in files for r in read_records(f)] == [bytes([i]) * 40 for i in range(5)]


def test_a_writer_that_falls_behind_drops_records_and_counts_them_without_waiting() -> None:
    from types import SimpleNamespace

    import numpy as np

    from frontend.request_log import DROPPED, QUEUE_RECORDS, RequestLog, Target
    from tfbroker.client import Prediction

    log = RequestLog(None, max_file_bytes=1 << 20)  # type: ignore[arg-type]  # its writer never started: it never drains
    log.targets = {"m": Target(1.0, "/nowhere/m")}
    call = SimpleNamespace(model="m", verb="predict", inputs={"x": np.zeros(1, np.float32)},
                           signature_name="serving_default")
    answer = Prediction({"y": np.zeros(1, np.float32)}, "m", 1)
    for _ in range(QUEUE_RECORDS + 3):
        log.offer(call, answer)
    assert log.counts[("m", DROPPED)] == 3
    log.targets = {}
    log.offer(call, answer)  # a model that does not log: nothing queued, nothing counted
    assert log.counts[("m", DROPPED)] == 3


def test_a_classify_is_logged_as_a_classify_log_of_its_examples_and_classes() -> None:
    import numpy as np

    from frontend import grpc_messages as pb
    from frontend.request_log import RequestLog, Target
    from tfbroker.client import Prediction

    examples = []
    for value in (1.0, 2.0):
        example = pb.Example()
        example.features.feature["x"].float_list.value.append(value)
        examples.append(example.SerializeToString())
    log = RequestLog(None, max_file_bytes=1 << 20)  # type: ignore[arg-type]
    log.saved_model_tags = ["serve"]
    answer = Prediction({"classes": np.array([[b"a", b"b"], [b"a", b"b"]], dtype=object),
                         "scores": np.array([[0.25, 0.75], [0.5, 0.5]], np.float32)}, "m", 7)
    entry = pb.PredictionLog.FromString(log._record(Target(0.5, "/nowhere/m"), "classify", examples, "cls", answer,
                                                    1_700_000_000.5))
    assert entry.WhichOneof("log_type") == "classify_log"
    assert (entry.log_metadata.model_spec.name, entry.log_metadata.model_spec.version.value,
            entry.log_metadata.model_spec.signature_name, entry.log_metadata.sampling_config.sampling_rate,
            list(entry.log_metadata.saved_model_tags), entry.log_metadata.timestamp_secs) == \
        ("m", 7, "cls", 0.5, ["serve"], 1_700_000_000)
    request, response = entry.classify_log.request, entry.classify_log.response
    assert [e.SerializeToString() for e in request.input.example_list.examples] == examples
    assert request.model_spec == response.model_spec == entry.log_metadata.model_spec
    assert [[(c.label, c.score) for c in row.classes] for row in response.result.classifications] == \
        [[("a", 0.25), ("b", 0.75)], [("a", 0.5), ("b", 0.5)]]


def test_a_version_loaded_since_the_brokers_last_word_waits_for_a_fresh_word_on_its_input() -> None:
    import asyncio

    from frontend.request_log import REFRESH_S, RequestLog

    class Broker:
        """Says version 2's signatures once it has been asked twice (it was loading before)."""

        asked = 0

        async def request_logging(self) -> dict[str, Any]:
            self.asked += 1
            signatures = {"serving_default": "x"} if self.asked > 1 else {}
            return {"models": {"m": {"sampling_rate": 1.0, "filename_prefix": "/nowhere/m",
                                     "only_inputs": {"2": signatures}}}}

    async def main() -> tuple[str, float, int]:
        broker = Broker()
        log = RequestLog(broker, max_file_bytes=1 << 20)  # type: ignore[arg-type]
        log.start()

        async def first_word() -> None:
            while not log.targets:
                await asyncio.sleep(0)

        await asyncio.wait_for(first_word(), 5)
        loop = asyncio.get_running_loop()
        started = loop.time()
        name = await loop.run_in_executor(None, log._only_input, log.targets["m"], "m", "2", "serving_default")
        await log.stop()
        return name, loop.time() - started, broker.asked

    name, waited_s, asked = asyncio.run(main())
    assert (name, asked) == ("x", 2)
    assert waited_s < REFRESH_S / 2, "the writer asks for the fresh word at once, not at the next refresh"
