"""The file-system source and version resolution, on real directories without processes."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.config import ModelConfig
from tfbroker.wire.errors import InvalidArgument, NotFound, Unavailable
from broker import lifecycle as lc
from broker.lifecycle import Lifecycle
from broker.models import ServedModel, ServedVersion, fingerprint, no_versions_reason
from broker.source import SETTLE_S, DiskChanges, VersionSource
from broker.versions import VersionState


def write_version(base: Path, number: int, content: bytes = b"graph") -> Path:
    path = base / str(number)
    path.mkdir(parents=True, exist_ok=True)
    (path / "saved_model.pb").write_bytes(content)
    return path


def test_start_up_takes_what_is_on_disk_and_a_new_directory_is_reported_once_settled(tmp_path: Path) -> None:
    write_version(tmp_path, 1)
    (tmp_path / "notes").mkdir()  # not numeric: ignored
    model = ServedModel(ModelConfig(name="m", base_path=str(tmp_path)))
    source = VersionSource(poll_wait_s=1.0)
    assert source.scan_now([model], now=0.0) == {"m": {1: str(tmp_path / "1")}}
    assert model.on_disk == {}  # the source reports; the version manager applies
    model.on_disk = {1: str(tmp_path / "1")}

    partial = tmp_path / "2"
    partial.mkdir()  # being copied: no saved_model.pb yet
    assert not source.poll([model], now=1.0)
    assert not source.poll([model], now=1.0 + SETTLE_S)  # still no SavedModel in it
    write_version(tmp_path, 2)
    assert not source.poll([model], now=1.0 + 2 * SETTLE_S)  # changed since: wait again
    changes = source.poll([model], now=1.0 + 3 * SETTLE_S)
    assert changes == DiskChanges(found=[("m", 2, str(partial))])
    assert set(model.on_disk) == {1}


def test_a_removed_directory_is_reported_gone(tmp_path: Path) -> None:
    write_version(tmp_path, 1)
    write_version(tmp_path, 2)
    model = ServedModel(ModelConfig(name="m", base_path=str(tmp_path)))
    source = VersionSource(poll_wait_s=1.0)
    model.on_disk = source.scan_now([model], now=0.0)["m"]
    for path in (tmp_path / "2").iterdir():
        path.unlink()
    (tmp_path / "2").rmdir()
    assert not source.poll([model], now=0.5)  # not due yet
    assert source.poll([model], now=1.0) == DiskChanges(gone=[("m", 2)])
    assert set(model.on_disk) == {1, 2}


def test_a_failed_version_is_reported_for_a_retry_once_its_files_change(tmp_path: Path) -> None:
    path = write_version(tmp_path, 1, b"broken")
    model = ServedModel(ModelConfig(name="m", base_path=str(tmp_path)))
    source = VersionSource(poll_wait_s=1.0)
    model.on_disk = source.scan_now([model], now=0.0)["m"]
    life = Lifecycle("model m version 1")
    life.handle(lc.LoadAsked())
    life.handle(lc.WorkerExited(4, restartable=False, error="bad graph"))
    assert life.state is VersionState.END
    model.versions[1] = ServedVersion("m", 1, str(path), life, files=fingerprint(str(path)))
    assert not source.poll([model], now=1.0)  # unchanged: stays failed
    (path / "saved_model.pb").write_bytes(b"fixed graph")
    assert source.poll([model], now=2.0) == DiskChanges(retry=[("m", 1)])
    assert model.versions[1].failed  # the source wrote nothing
    del model.versions[1], model.on_disk[1]  # what the version manager does with a retry
    assert not source.poll([model], now=2.0 + SETTLE_S / 2)  # settles again first
    assert source.poll([model], now=2.0 + SETTLE_S) == DiskChanges(found=[("m", 1, str(path))])


def test_polling_off_scans_nothing(tmp_path: Path) -> None:
    write_version(tmp_path, 1)
    model = ServedModel(ModelConfig(name="m", base_path=str(tmp_path)))
    source = VersionSource(poll_wait_s=-1)
    assert source.scan_now([model], now=0.0) == {}
    assert not source.poll([model], now=100.0)


# The events that bring a lifecycle from START to each state.
TO_STATE = {VersionState.LOADING: [lc.LoadAsked()], VersionState.AVAILABLE: [lc.LoadAsked(), lc.WorkerReady()],
            VersionState.UNLOADING: [lc.LoadAsked(), lc.WorkerReady(), lc.UnloadAsked()]}


def to_state(served: ServedVersion, state: VersionState) -> None:
    """Drive a version's lifecycle on to ``state`` with the events the broker would feed it."""
    order = [VersionState.START, *TO_STATE]
    for event in TO_STATE[state][order.index(served.state):]:
        served.life.handle(event)
    assert served.state is state


def version(model: ServedModel, number: int, state: VersionState, **fields: object) -> ServedVersion:
    served = ServedVersion("m", number, f"/m/{number}", Lifecycle(f"version {number}"), **fields)  # type: ignore[arg-type]
    to_state(served, state)
    model.versions[number] = served
    return served


def available(model: ServedModel, number: int, **fields: object) -> ServedVersion:
    return version(model, number, VersionState.AVAILABLE, **fields)


def test_resolution_pins_the_newest_available_version_and_labels_follow_availability() -> None:
    model = ServedModel(ModelConfig(name="m", base_path="/m"), wanted_labels={"stable": 1, "canary": 2})
    available(model, 1)
    version(model, 2, VersionState.LOADING)
    model.update_labels()
    assert model.labels == {"stable": 1}  # canary waits for version 2
    assert model.resolve(None, None).version == 1
    with pytest.raises(Unavailable):
        model.resolve(2, None)
    with pytest.raises(InvalidArgument, match="Unrecognized servable version label: canary"):
        model.resolve(None, "canary")  # TF Serving's InvalidArgument (400)

    to_state(model.versions[2], VersionState.AVAILABLE)
    model.update_labels()
    assert model.labels == {"stable": 1, "canary": 2}
    assert model.resolve(None, None).version == 2
    assert model.resolve(None, "stable").version == 1

    to_state(model.versions[1], VersionState.UNLOADING)
    model.update_labels()
    assert model.labels == {"canary": 2}
    with pytest.raises(NotFound):
        model.resolve(1, None)
    model.versions[2].life.handle(lc.StopAdmissions())
    with pytest.raises(Unavailable):
        model.resolve(None, None)


def test_a_base_path_without_versions_is_logged_once_then_at_most_once_a_minute_with_the_reason(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = ServedModel(ModelConfig(name="mine", base_path=str(tmp_path / "nowhere")))
    source = VersionSource(poll_wait_s=1.0)
    with caplog.at_level("ERROR", logger="tfbroker.source"):
        source.scan_now([model], now=0.0)
        for second in range(1, 121):
            source.poll([model], now=float(second))
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3, messages  # at 0, 60 and 120 s
    assert messages[0] == (f"No versions of servable mine found under base path {tmp_path / 'nowhere'}: base path "
                           f"{tmp_path / 'nowhere'} does not exist (TF Serving's layout: "
                           f"{tmp_path / 'nowhere'}/1/saved_model.pb)")


def test_the_reason_for_no_versions_says_what_to_pass(tmp_path: Path) -> None:
    version = write_version(tmp_path / "mine", 1)
    assert no_versions_reason(str(version)) == (f"no version directory under {version}: it looks like a version "
                                                f"directory; pass its parent {tmp_path / 'mine'}")
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "saved_model.pb").write_bytes(b"graph")
    assert "holds a SavedModel itself; move it into a numbered folder" in no_versions_reason(str(flat))
    (tmp_path / "empty").mkdir()
    assert no_versions_reason(str(tmp_path / "empty")).startswith(f"no numeric version directory under "
                                                                  f"{tmp_path / 'empty'}")
