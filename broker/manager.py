"""The broker's version manager: carries out what the pure policies decide.

Each housekeeping tick it asks broker/versions.py for the next step of every model (load or
unload a version) and feeds it to that version's lifecycle (broker/lifecycle.py), as it feeds
the events the fleet and the lookup stage report (worker READY or exit, tables loaded,
drained). The lifecycle alone changes a version's state; ``handle`` carries out the actions
it returns (spawn, load tables, fail requests, disconnect, terminate). Requests are pinned to
a version at admission, so a swap never fails or mixes one. It also applies config reloads
and the control channel's load, unload, label and drain.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from typing import Any, Callable

from broker import lifecycle as lc
from broker.config import ModelConfig, ServerConfig
from broker.config_files import load_batching_parameters
from broker.fleet import Fleet
from broker.inflight import InFlight
from broker.lookups import LookupStage
from tfbroker.wire.errors import ConfigError, InvalidArgument, NotFound, Unavailable
from broker.models import ServedModel, ServedVersion, find_versions, fingerprint
from broker.source import DiskChanges, VersionSource
from broker.versions import Load, VersionState, next_action

HISTORY = 30  # changes of version state kept for the status page

log = logging.getLogger("tfbroker.versions")

# Ended versions kept per model for status (failed ones stay while their directory does).
ENDED_HISTORY = 4
# Steps taken per model per tick; each one changes a state, so a few always suffice.
MAX_STEPS_PER_TICK = 8
# Where a version declares its lookups (paths in it are relative to this directory).
LOOKUPS_FILE = os.path.join("assets.extra", "lookups.json")
# A version's own batching parameters (--enable_per_model_batching_parameters), as TF Serving's.
BATCHING_FILE = "batching_params.pbtxt"


class VersionManager:
    """The one owner of the served models and their versions: it alone adds and removes
    them, and applies what the source finds on disk."""

    def __init__(self, config: ServerConfig, fleet: Fleet, lookups: LookupStage, inflight: InFlight,
                 source: VersionSource, *, on_available: Callable[[], None] = lambda: None) -> None:
        self.config = config
        self._on_available = on_available  # a version became AVAILABLE (the ready message)
        self.models: dict[str, ServedModel] = {}
        self.history: deque[dict[str, Any]] = deque(maxlen=HISTORY)  # the last changes of state, newest last
        self._fleet = fleet
        self._lookups = lookups
        self._inflight = inflight
        self._source = source

    def scan(self, now: float) -> None:
        """Start-up: take what each base path holds as it is."""
        for name, found in self._source.scan_now(self.models.values(), now).items():
            self.models[name].on_disk = found

    def poll_disk(self, now: float) -> None:
        """Apply what the source found since the last tick: new, gone and changed directories."""
        self._apply_disk(self._source.poll(list(self.models.values()), now))

    def reconcile(self, now: float) -> None:
        for model in list(self.models.values()):
            for _ in range(MAX_STEPS_PER_TICK):
                action = next_action(model.snapshots(), model.aspired(), self.config.version_swap_policy)
                if action is None:
                    break
                if isinstance(action, Load):
                    self._load(model, action.version, now)
                else:
                    served = model.versions[action.version]
                    log.info("unloading model %s version %d (was %s)", model.name, served.version, served.state.value)
                    self.handle(served, lc.UnloadAsked(), now)
            self._finish_unloads(model, now)
            self._note_labels(model)
            self._prune(model)

    def handle(self, served: ServedVersion, event: lc.Event, now: float) -> None:
        """Feed one event to the version's lifecycle and carry out the actions it returns."""
        before = served.state
        for action in served.life.handle(event):
            self._carry_out(served, action, now)
        if served.state is not before:
            self._record(served, before, now)

    def _record(self, served: ServedVersion, before: VersionState, now: float) -> None:
        """A version's change of state, for the status page's list of the last swaps."""
        entry: dict[str, Any] = {"time": time.time(), "model": served.model, "version": served.version,
                                 "from": before.value, "to": served.state.value}
        if served.state is VersionState.AVAILABLE and served.load_started:
            entry["load_s"] = round(now - served.load_started, 2)
        if served.error:
            entry["error"] = served.error
        self.history.append(entry)

    def stop_all(self, now: float) -> None:
        """Shutdown: every version unloads after the requests it holds."""
        for model in self.models.values():
            for served in list(model.versions.values()):
                self.handle(served, lc.UnloadAsked(), now)
                if not served.has_work():
                    self.handle(served, lc.Drained(), now)

    # --- configuration ---

    def apply_model_config(self, models: list[ModelConfig]) -> list[str]:
        """A (re)read model_config_list: add, update and remove models. What changed, for the log."""
        changes = []
        wanted = {m.name: m for m in models}
        for name, model in self.models.items():
            if name not in wanted and not model.removed:
                model.removed = True
                changes.append(f"model {name} removed: its versions unload")
        for name, config in wanted.items():
            existing = self.models.get(name)
            if existing is None:
                model = self.models[name] = ServedModel(config)
                changes.append(f"model {name} added")
            else:
                model = existing
                if model.config != config or model.removed:
                    changes.append(f"model {name} updated")
            if model.config.base_path != config.base_path:
                # An operator's explicit change: take the new path's versions as they are, so
                # the old ones keep serving until the new ones are AVAILABLE.
                model.on_disk = find_versions(config.base_path)
                self._source.forget(name)
            model.config = config
            model.removed = False
            model.wanted_labels = dict(config.version_labels)
            model.loaded_by_hand.clear()  # the config file is the truth again
            model.unloaded_by_hand.clear()
            model.unloaded = False
            self._note_labels(model)
        return changes

    # --- control channel ---

    def load_model_by_hand(self, name: str) -> str:
        """The model repository's load: what its version policy wants serves again (after an
        unload), its version directories looked at afresh."""
        model = self._model(name)
        model.on_disk = {**find_versions(model.config.base_path), **model.on_disk}
        model.unloaded = False
        if not model.aspired():
            raise NotFound(f"model {name} has no version to load under {model.config.base_path}")
        return f"model {name} will serve versions {', '.join(map(str, sorted(model.aspired())))}"

    def unload_model_by_hand(self, name: str) -> str:
        """The model repository's unload: every version of the model, after the requests it holds."""
        self._model(name).unloaded = True
        return f"model {name} unloads every version after the requests it holds"

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
            self.handle(served, lc.ResumeAdmissions(), time.monotonic())
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
        self.handle(served, lc.StopAdmissions(), time.monotonic())
        self._note_labels(model)  # a label points only at a version that takes requests
        return (f"model {name} version {version} takes no new requests; `load {name} {version}` "
                "sends it requests again")

    # --- implementation ---

    def _model(self, name: str) -> ServedModel:
        model = self.models.get(name)
        if model is None or model.removed:
            raise NotFound(f"no model named {name}")
        return model

    def _load(self, model: ServedModel, number: int, now: float) -> None:
        path = model.on_disk[number]
        name = f"model {model.name} version {number}"
        life = lc.Lifecycle(name, needs_tables=os.path.isfile(os.path.join(path, LOOKUPS_FILE)),
                            replicas=self._fleet.replicas)
        served = ServedVersion(model.name, number, path, life, files=fingerprint(path), load_started=now)
        model.versions[number] = served
        error = ""
        batching_file = os.path.join(path, BATCHING_FILE)
        if self.config.enable_per_model_batching_parameters and os.path.isfile(batching_file):
            try:
                served.batching = load_batching_parameters(batching_file)
            except ConfigError as exc:
                error = f"its {BATCHING_FILE} cannot be used: {exc}"
        log.info("loading %s from %s%s%s", name, path, " (with lookup tables)" if life.needs_tables else "",
                 " (with its own batching parameters)" if served.batching else "")
        self.handle(served, lc.LoadAsked(), now)
        if error:
            self.handle(served, lc.LoadFailed(error), now)

    def _carry_out(self, served: ServedVersion, action: lc.Action, now: float) -> None:
        fleet = self._fleet
        if isinstance(action, lc.SpawnWorker):
            fleet.spawn_worker(served, action.replica)
        elif isinstance(action, lc.RestartWorker):
            fleet.restart_worker(served, action.replica, now, at_once=action.at_once)
        elif isinstance(action, lc.CancelRestart):
            fleet.cancel_restart(served, action.replica)
        elif isinstance(action, lc.DisconnectWorker):
            fleet.disconnect_worker(served, action.replica, now)
        elif isinstance(action, lc.Terminate):
            fleet.terminate_worker(served, action.replica, action.reason, dump=action.stuck)
        elif isinstance(action, lc.Requeue):
            link = served.link(action.replica)
            if link is not None:
                if action.crashed:
                    self._inflight.isolate(served, link, now)
                else:
                    self._inflight.requeue(served, link)
        elif isinstance(action, lc.LoadTables):
            self._lookups.load_tables(served)
        elif isinstance(action, lc.UnloadTables):
            self._lookups.unload_tables(served)
        elif isinstance(action, lc.FailRequests):
            if action.replica is None:
                self._inflight.fail_version(served, Unavailable(action.message))
            else:
                link = served.link(action.replica)
                self._inflight.fail(link.take_in_flight() if link else [], Unavailable(action.message))
        elif isinstance(action, lc.BecameAvailable):
            served.counters.record_load("OK", time.monotonic() - served.load_started)
            log.info("serving model %s version %d (signatures %s)", served.model, served.version,
                     sorted(served.signatures))
            model = self.models.get(served.model)
            if model is not None:
                self._note_labels(model)  # the latest AVAILABLE version takes new admissions
            self._on_available()
        elif isinstance(action, lc.Ended):
            served.ended_at = now
            fleet.forget_version(served)
            if served.error:
                served.counters.record_load("error")
                log.error("model %s version %d failed to load: %s", served.model, served.version, served.error)
            else:
                log.info("model %s version %d unloaded", served.model, served.version)

    def _finish_unloads(self, model: ServedModel, now: float) -> None:
        """An UNLOADING version whose requests have left every stage is Drained; its worker
        gets ``shutdown_grace_s`` to go after it was told to."""
        for served in list(model.versions.values()):
            if served.state is not VersionState.UNLOADING:
                continue
            if not served.has_work():
                self.handle(served, lc.Drained(), now)
            if any(link.disconnect_sent and not link.child.terminated_at
                   and now - link.disconnect_sent > self.config.shutdown_grace_s for link in served.links()):
                self.handle(served, lc.GraceExpired(), now)

    def _apply_disk(self, changes: DiskChanges) -> None:
        for name, number in changes.gone:
            model = self.models.get(name)
            if model is not None:
                model.on_disk.pop(number, None)
        for name, number in changes.retry:  # changed on disk since it failed to load: a fresh start
            model = self.models.get(name)
            if model is not None:
                model.versions.pop(number, None)
                model.on_disk.pop(number, None)
        for name, number, path in changes.found:
            model = self.models.get(name)
            if model is not None and not model.removed:
                model.on_disk[number] = path

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
            del self.models[model.name]
            log.info("model %s removed", model.name)
