"""The file-system version source: which version directories each model's base path holds.

Every ``file_system_poll_wait_seconds`` it lists each base path (TF Serving's meaning: 0
lists once at start-up, a negative value never after start-up). A new directory may still
be being copied, so it is reported only once its files have stopped changing for SETTLE_S;
a directory whose load failed is reported for a retry once its files change.

The source only reports (DiskChanges): the version manager applies what it finds to
``ServedModel.on_disk``, and alone adds and removes versions.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from broker.models import ServedModel, find_versions, fingerprint, no_versions_reason

log = logging.getLogger("tfbroker.source")

# How long a new version directory's files must stay unchanged before it is loaded.
SETTLE_S = 0.5
# A base path with no version in it is logged once, then at most this often.
NO_VERSIONS_LOG_EVERY_S = 60.0
SAVED_MODEL_FILES = ("saved_model.pb", "saved_model.pbtxt", "model.tflite")  # (TensorFlow Lite: --prefer_tflite_model)


@dataclass(slots=True)
class DiskChanges:
    """What one poll found, by (model, version)."""

    found: list[tuple[str, int, str]] = field(default_factory=list)  # settled new directories, with their path
    gone: list[tuple[str, int]] = field(default_factory=list)  # directories no longer there
    retry: list[tuple[str, int]] = field(default_factory=list)  # failed versions whose files changed

    def __bool__(self) -> bool:
        return bool(self.found or self.gone or self.retry)


@dataclass(slots=True)
class _Candidate:
    path: str
    files: tuple[Any, ...]
    since: float


class VersionSource:
    def __init__(self, poll_wait_s: float) -> None:
        self.poll_wait_s = poll_wait_s
        self._next_poll = 0.0
        self._candidates: dict[tuple[str, int], _Candidate] = {}
        self._empty_logged: dict[str, float] = {}  # base path -> when its emptiness was last logged

    def scan_now(self, models: Iterable[ServedModel], now: float) -> dict[str, dict[int, str]]:
        """At start-up: what is on disk as it is, without waiting for it to settle (model name
        -> version -> path; nothing when polling is off)."""
        if self.poll_wait_s < 0:
            self._next_poll = float("inf")
            log.info("file-system polling is off: versions load only by `python -m broker.ctl load`")
            return {}
        found = {}
        for model in models:
            found[model.name] = find_versions(model.config.base_path)
            self._check_empty(model, found[model.name], now)
        self._next_poll = now + self.poll_wait_s if self.poll_wait_s > 0 else float("inf")
        return found

    def poll(self, models: Sequence[ServedModel], now: float) -> DiskChanges:
        """Rescan when due and settle candidates: what changed on disk since the last poll."""
        changes = DiskChanges()
        if now >= self._next_poll:
            self._next_poll = now + self.poll_wait_s
            for model in models:
                self._scan(model, now, changes)
        for key, candidate in list(self._candidates.items()):
            if now - candidate.since < SETTLE_S:
                continue
            files = fingerprint(candidate.path)
            if files != candidate.files or not _has_saved_model(files):
                candidate.files, candidate.since = files, now
                continue
            del self._candidates[key]
            found = next((m for m in models if m.name == key[0]), None)
            if found is not None and not found.removed:
                log.info("found version %d of model %s in %s", key[1], key[0], candidate.path)
                changes.found.append((key[0], key[1], candidate.path))
        return changes

    def forget(self, model: str) -> None:
        for key in [k for k in self._candidates if k[0] == model]:
            del self._candidates[key]

    # --- implementation ---

    def _check_empty(self, model: ServedModel, found: dict[int, str], now: float) -> None:
        """TF Serving's words for a base path without versions, with the reason; once, then at
        most every NO_VERSIONS_LOG_EVERY_S while it stays so."""
        path = model.config.base_path
        if found:
            self._empty_logged.pop(path, None)
            return
        last = self._empty_logged.get(path)
        if last is None or now - last >= NO_VERSIONS_LOG_EVERY_S:
            self._empty_logged[path] = now
            log.error("No versions of servable %s found under base path %s: %s", model.name, path,
                      no_versions_reason(path))

    def _scan(self, model: ServedModel, now: float, changes: DiskChanges) -> None:
        found = find_versions(model.config.base_path)
        self._check_empty(model, found, now)
        for number in [n for n in model.on_disk if n not in found]:
            log.info("version %d of model %s is gone from %s", number, model.name, model.config.base_path)
            changes.gone.append((model.name, number))
        for number, path in found.items():
            key = (model.name, number)
            if key in self._candidates:
                continue
            if number in model.on_disk:
                served = model.versions.get(number)
                if served is None or not served.failed or fingerprint(path) == served.files:
                    continue
                log.info("version %d of model %s changed on disk since it failed to load; "
                         "it loads again once its files settle", number, model.name)
                changes.retry.append((model.name, number))
            self._candidates[key] = _Candidate(path, fingerprint(path), now)


def _has_saved_model(files: tuple[Any, ...]) -> bool:
    return any(entry[0] in SAVED_MODEL_FILES for entry in files)
