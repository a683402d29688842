"""The version policy and the swap policy as pure functions: no processes."""

from __future__ import annotations

from typing import Sequence

import pytest

from broker.config import RESOURCE_PRESERVING, ModelVersionPolicy
from broker.versions import Action, Load, Unload, VersionSnapshot, VersionState, aspired_versions, next_action

S = VersionState


def snap(version: int, state: VersionState, failed: bool = False) -> VersionSnapshot:
    return VersionSnapshot(version, state, failed)


@pytest.mark.parametrize("policy, on_disk, expected", [
    (ModelVersionPolicy(), {1, 2, 3}, {3}),
    (ModelVersionPolicy(kind="latest", num_versions=2), {1, 5, 3}, {3, 5}),
    (ModelVersionPolicy(kind="latest", num_versions=5), {1, 2}, {1, 2}),
    (ModelVersionPolicy(kind="all"), {1, 2, 3}, {1, 2, 3}),
    (ModelVersionPolicy(kind="specific", versions=(2, 9)), {1, 2, 3}, {2}),
    (ModelVersionPolicy(), set(), set()),
])
def test_aspired_versions_follow_tf_servings_policies(policy: ModelVersionPolicy, on_disk: set[int],
                                                      expected: set[int]) -> None:
    assert aspired_versions(policy, on_disk) == expected


def run_swap(states: dict[int, VersionState], aspired: set[int], policy: str = "availability_preserving",
             load_fails: Sequence[int] = ()) -> tuple[list[Action], int]:
    """Apply next_action until it says None, completing each step at once as the broker would
    (a load becomes AVAILABLE or failed END, an unload becomes END); the actions and the most
    copies held at any moment."""
    actions: list[Action] = []
    failed: set[int] = set()
    most = 0
    for _ in range(50):
        copies = sum(1 for s in states.values() if s in (S.LOADING, S.AVAILABLE, S.UNLOADING))
        most = max(most, copies)
        snapshots = [snap(v, s, v in failed) for v, s in states.items()]
        action = next_action(snapshots, aspired, policy)
        assert next_action(snapshots, aspired, policy) == action  # pure: same states, same answer
        if action is None:
            return actions, most
        actions.append(action)
        if isinstance(action, Load):
            states[action.version] = S.LOADING
            most = max(most, copies + 1)
            if action.version in load_fails:
                states[action.version] = S.END
                failed.add(action.version)
            else:
                states[action.version] = S.AVAILABLE
        else:
            states[action.version] = S.UNLOADING
            most = max(most, copies)
            states[action.version] = S.END
    raise AssertionError(f"no end to the actions: {actions}")


def test_availability_preserving_swap_loads_the_new_version_before_unloading_the_old() -> None:
    actions, most = run_swap({1: S.AVAILABLE}, {2})
    assert actions == [Load(2), Unload(1)]
    assert most == 2


def test_resource_preserving_swap_unloads_first_and_never_holds_two_copies() -> None:
    actions, most = run_swap({1: S.AVAILABLE}, {2}, RESOURCE_PRESERVING)
    assert actions == [Unload(1), Load(2)]
    assert most == 1


def test_a_version_that_fails_to_load_leaves_the_old_one_serving() -> None:
    states = {1: S.AVAILABLE}
    actions, _ = run_swap(states, {2}, load_fails=[2])
    assert actions == [Load(2)]
    assert states[1] is S.AVAILABLE
    # and it is not retried while its files stay as they are
    assert next_action([snap(1, S.AVAILABLE), snap(2, S.END, failed=True)], {2}) is None


def test_the_old_version_waits_while_the_new_one_loads() -> None:
    assert next_action([snap(1, S.AVAILABLE), snap(2, S.LOADING)], {2}) is None


def test_a_third_version_waits_for_the_unload_of_the_first() -> None:
    versions = [snap(1, S.UNLOADING), snap(2, S.AVAILABLE)]
    assert next_action(versions, {3}) is None  # two copies held already
    assert next_action([snap(1, S.END), snap(2, S.AVAILABLE)], {3}) == Load(3)


def test_latest_two_never_holds_more_than_three_copies() -> None:
    actions, most = run_swap({1: S.AVAILABLE, 2: S.AVAILABLE}, {3, 4})
    assert set(actions) == {Load(3), Load(4), Unload(1), Unload(2)}
    assert actions[0] == Load(4)  # newest first
    assert most == 3


def test_removing_every_version_unloads_them() -> None:
    actions, _ = run_swap({1: S.AVAILABLE, 2: S.AVAILABLE}, set())
    assert actions == [Unload(1), Unload(2)]


def test_a_loading_version_no_longer_wanted_is_unloaded_at_once() -> None:
    assert next_action([snap(1, S.AVAILABLE), snap(2, S.LOADING)], {1}) == Unload(2)


def test_start_up_with_all_versions_loads_them_all() -> None:
    actions, most = run_swap({}, {1, 2, 3})
    assert sorted(a.version for a in actions) == [1, 2, 3]
    assert all(isinstance(a, Load) for a in actions)
    assert most == 3


def test_a_version_unloaded_cleanly_loads_again_when_aspired_again() -> None:
    assert next_action([snap(1, S.END), snap(2, S.AVAILABLE)], {1, 2}) == Load(1)
