"""Which versions to serve, and the next step of a swap: pure functions, tested without processes.

``aspired_versions`` applies TF Serving's ``model_version_policy`` to the version directories
on disk. ``next_action`` looks at the versions' states and returns one step (load or unload
one version) or None; the broker applies it and asks again. Both are pure and idempotent:
the same states give the same answer.

Availability preserving (the default, TF Serving's AvailabilityPreservingPolicy): a new
version loads next to the old one; the old one unloads only once an aspired version is
AVAILABLE. The device holds at most one copy more than the policy keeps.

Resource preserving (TF Serving's ResourcePreservingPolicy, for a card too small for two
copies): versions that are not aspired unload first, and the new one loads only once they
are gone. The model is briefly unavailable during a swap (HTTP 503).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Iterable, Sequence

from broker.config import AVAILABILITY_PRESERVING, RESOURCE_PRESERVING, ModelVersionPolicy


class VersionState(enum.Enum):
    """TF Serving's ModelVersionStatus states."""

    START = "START"
    LOADING = "LOADING"
    AVAILABLE = "AVAILABLE"
    UNLOADING = "UNLOADING"
    END = "END"


# States in which a version holds (or is about to hold) a copy of the model.
HOLDS_A_COPY = frozenset({VersionState.LOADING, VersionState.AVAILABLE, VersionState.UNLOADING})


@dataclass(frozen=True, slots=True)
class VersionSnapshot:
    """What the policy needs to know of one version."""

    version: int
    state: VersionState
    failed: bool = False  # ended with a load or warm-up error: not retried until its files change


@dataclass(frozen=True, slots=True)
class Load:
    version: int


@dataclass(frozen=True, slots=True)
class Unload:
    version: int


Action = Load | Unload


def aspired_versions(policy: ModelVersionPolicy, on_disk: Iterable[int]) -> set[int]:
    """The versions TF Serving's ``model_version_policy`` keeps, of those on disk."""
    found = set(on_disk)
    if policy.kind == "all":
        return found
    if policy.kind == "specific":
        return found & set(policy.versions)
    return set(sorted(found)[-policy.num_versions:]) if found else set()


def next_action(versions: Sequence[VersionSnapshot], aspired: set[int],
                swap_policy: str = AVAILABILITY_PRESERVING) -> Action | None:
    """The next step towards serving exactly ``aspired``, or None when nothing is to be done.

    Unloads come before loads, oldest first; loads go one at a time, newest first.
    """
    by_version = {v.version: v for v in versions}
    unwanted = sorted(v.version for v in versions if v.version not in aspired and v.state in HOLDS_A_COPY
                      and v.state is not VersionState.UNLOADING)
    aspired_available = any(by_version[n].state is VersionState.AVAILABLE for n in aspired if n in by_version)
    aspired_loadable = [n for n in aspired
                        if n not in by_version or (by_version[n].state is VersionState.START)
                        or (by_version[n].state is VersionState.END and not by_version[n].failed)]
    if unwanted:
        # A version still loading that nobody wants any more goes at once; a serving one goes
        # once an aspired version can take its traffic, or when nothing is aspired at all. If
        # every aspired version failed to load, the old one keeps serving.
        loading = [n for n in unwanted if by_version[n].state is VersionState.LOADING]
        if loading:
            return Unload(loading[0])
        if swap_policy == RESOURCE_PRESERVING or aspired_available or not aspired:
            return Unload(unwanted[0])
    if not aspired_loadable or any(v.state is VersionState.LOADING for v in versions):
        return None
    copies = sum(1 for v in versions if v.state in HOLDS_A_COPY)
    budget = len(aspired) + (0 if swap_policy == RESOURCE_PRESERVING else 1)
    if copies >= budget:
        return None
    return Load(max(aspired_loadable))

