"""The broker's version manager: applies broker/versions.py's steps to real workers.

Each housekeeping tick it asks the pure policy for the next step of every model and carries
it out: Load spawns a worker for the version (LOADING until its READY); Unload stops new
admissions to it (UNLOADING), lets its queued and in-flight batches finish, then tells the
worker to go. Requests are pinned to a version at admission, so a swap never fails or mixes
one. It also applies config reloads and the control channel's load, unload, label and drain.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from broker.config import ModelConfig
from broker.errors import InvalidArgument, NotFound
from broker.models import ServedModel, ServedVersion, find_versions, fingerprint
from broker.supervisor import terminate_child
from broker.versions import Load, VersionState, next_action

if TYPE_CHECKING:
    from broker.server import Broker

log = logging.getLogger("tfbroker.versions")

# Ended versions kept per model for status (failed ones stay while their directory does).
ENDED_HISTORY = 4
# Steps taken per model per tick; each one changes a state, so a few always suffice.
MAX_STEPS_PER_TICK = 8


class VersionManager:
    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.config = broker.config

    def reconcile(self, now: float) -> None:
        for model in list(self.broker.models.values()):
            for _ in range(MAX_STEPS_PER_TICK):
                action = next_action(model.snapshots(), model.aspired(), self.config.version_swap_policy)
                if action is None:
                    break
                if isinstance(action, Load):
                    self._load(model, action.version)
                else:
                    self._unload(model, action.version, now)
            self._finish_unloads(model, now)
            self._note_labels(model)
            self._prune(model)

    def on_available(self, served: ServedVersion) -> None:
        """A worker said READY: new admissions go to it from now on (the latest AVAILABLE wins)."""
        model = self.broker.models.get(served.model)
        if model is not None:
            self._note_labels(model)

    def on_worker_exit(self, served: ServedVersion, now: float) -> None:
        """The worker of a version exited for good (unloaded, or failed to load)."""
        served.state = VersionState.END
        served.ended_at = now
        if not served.error:
            log.info("model %s version %d unloaded", served.model, served.version)

    # --- configuration ---

    def apply_model_config(self, models: list[ModelConfig]) -> list[str]:
        """A (re)read model_config_list: add, update and remove models. What changed, for the log."""
        changes = []
        wanted = {m.name: m for m in models}
        for name, model in self.broker.models.items():
            if name not in wanted and not model.removed:
                model.removed = True
                changes.append(f"model {name} removed: its versions unload")
        for name, config in wanted.items():
            existing = self.broker.models.get(name)
            if existing is None:
                model = self.broker.models[name] = ServedModel(config)
                changes.append(f"model {name} added")
            else:
                model = existing
                if model.config != config or model.removed:
                    changes.append(f"model {name} updated")
            if model.config.base_path != config.base_path:
                # An operator's explicit change: take the new path's versions as they are, so
                # the old ones keep serving until the new ones are AVAILABLE.
                model.on_disk = find_versions(config.base_path)
                self.broker.source.forget(name)
            model.config = config
            model.removed = False
            model.wanted_labels = dict(config.version_labels)
            model.loaded_by_hand.clear()  # the config file is the truth again
            model.unloaded_by_hand.clear()
            self._note_labels(model)
        return changes

    # --- control channel ---

    def load_by_hand(self, name: str, version: int) -> str:
        model = self._model(name)
        if version not in model.on_disk:  # not seen yet (or polling is off): look now
            found = find_versions(model.config.base_path)
            if version in found:
                model.on_disk[version] = found[version]
        if version not in model.on_disk:
            raise NotFound(f"model {name} has no version directory {version} under {model.config.base_path}")
        served = model.versions.get(version)
        model.unloaded_by_hand.discard(version)
        model.loaded_by_hand.add(version)
        if served is not None and served.draining:
            served.draining = False
            self._note_labels(model)  # its labels point at it again from now on
            return f"model {name} version {version} takes requests again"
        if served is not None and served.failed:
            del model.versions[version]  # try again
        return f"model {name} version {version} will load"

    def unload_by_hand(self, name: str, version: int) -> str:
        model = self._model(name)
        if version not in model.versions and version not in model.on_disk:
            raise NotFound(f"model {name} has no version {version}")
        model.loaded_by_hand.discard(version)
        model.unloaded_by_hand.add(version)
        return f"model {name} version {version} will unload after the requests it holds"

    def set_label(self, name: str, label: str, version: int) -> str:
        model = self._model(name)
        ModelConfig(name=name, base_path=".", version_labels=((label, version),))  # validates the label
        served = model.versions.get(version)
        if served is None or served.state is not VersionState.AVAILABLE:
            state = served.state.value if served else "not loaded"
            raise InvalidArgument(f"cannot point label {label} of model {name} at version {version}: it is "
                                  f"{state}, and a label only points at an AVAILABLE version")
        model.wanted_labels[label] = version
        self._note_labels(model)
        return f"model {name}: label {label} -> version {version}"

    def drain(self, name: str, version: int) -> str:
        model = self._model(name)
        served = model.versions.get(version)
        if served is None or served.state is not VersionState.AVAILABLE:
            raise NotFound(f"model {name} has no AVAILABLE version {version}")
        others = [v for v in model.versions.values()
                  if v is not served and v.state is VersionState.AVAILABLE and not v.draining]
        if not others:
            raise InvalidArgument(f"version {version} is the only version of model {name} taking requests; "
                                  "load another first, or unload this one")
        served.draining = True
        self._note_labels(model)  # a label points only at a version that takes requests
        return (f"model {name} version {version} takes no new requests; `load {name} {version}` "
                "sends it requests again")

    # --- implementation ---

    def _model(self, name: str) -> ServedModel:
        model = self.broker.models.get(name)
        if model is None or model.removed:
            raise NotFound(f"no model named {name}")
        return model

    def _load(self, model: ServedModel, number: int) -> None:
        path = model.on_disk[number]
        served = ServedVersion(model.name, number, path, files=fingerprint(path))
        model.versions[number] = served
        log.info("loading model %s version %d from %s", model.name, number, path)
        self.broker.fleet.spawn_worker(served)

    def _unload(self, model: ServedModel, number: int, now: float) -> None:
        served = model.versions[number]
        was = served.state
        served.state = VersionState.UNLOADING
        log.info("unloading model %s version %d (was %s)", model.name, number, was.value)
        if was is VersionState.LOADING and served.worker is not None:
            self.broker.fleet.stop_worker(served, now)  # nothing admitted yet: no need to wait

    def _finish_unloads(self, model: ServedModel, now: float) -> None:
        """Tell an UNLOADING version's worker to go once its requests are answered; kill it if
        it has not gone ``shutdown_grace_s`` after that."""
        for served in model.versions.values():
            if served.state is not VersionState.UNLOADING or served.worker is None:
                continue
            link = served.worker
            if not served.has_work() and not link.disconnect_sent and link.ready:
                self.broker.send_disconnect(link)
                link.disconnect_sent = now
            elif (link.disconnect_sent and not link.child.terminated_at
                  and now - link.disconnect_sent > self.config.shutdown_grace_s):
                terminate_child(link.child, f"still running {self.config.shutdown_grace_s:.0f} s after unload")

    def _note_labels(self, model: ServedModel) -> None:
        for change in model.update_labels():
            log.info("model %s: %s", model.name, change)

    def _prune(self, model: ServedModel) -> None:
        ended = sorted((v for v in model.versions.values() if v.state is VersionState.END),
                       key=lambda v: v.ended_at)
        keep = {v.version for v in ended[-ENDED_HISTORY:]}
        for served in ended:
            if served.version in keep or (served.failed and served.version in model.on_disk):
                continue
            del model.versions[served.version]
        if model.removed and all(v.state is VersionState.END for v in model.versions.values()):
            del self.broker.models[model.name]
            log.info("model %s removed", model.name)
