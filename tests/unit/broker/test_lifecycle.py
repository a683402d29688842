"""A version's lifecycle as a pure state machine: events in, state and actions out, no processes."""

from __future__ import annotations

from typing import Sequence

import pytest

from broker import lifecycle as lc
from broker.lifecycle import Lifecycle, Replica
from broker.versions import Load, Unload, VersionSnapshot, VersionState, next_action

S = VersionState


def run(life: Lifecycle, *events: lc.Event) -> list[lc.Action]:
    actions: list[lc.Action] = []
    for event in events:
        actions.extend(life.handle(event))
    return actions


def kinds(actions: Sequence[lc.Action]) -> list[type]:
    return [type(a) for a in actions]


def test_a_plain_version_loads_serves_drains_and_ends() -> None:
    life = Lifecycle("v1")
    assert kinds(run(life, lc.LoadAsked())) == [lc.SpawnWorker]
    assert life.state is S.LOADING
    assert kinds(run(life, lc.WorkerReady())) == [lc.BecameAvailable]
    assert life.state is S.AVAILABLE
    assert run(life, lc.UnloadAsked()) == []  # admissions stop; the worker stays for its requests
    assert life.state is S.UNLOADING
    assert kinds(run(life, lc.Drained())) == [lc.DisconnectWorker]
    assert run(life, lc.Drained()) == []  # told once
    assert kinds(run(life, lc.WorkerExited(0, True))) == [lc.FailRequests, lc.Ended]
    assert life.state is S.END and not life.failed


@pytest.mark.parametrize("order", [(lc.WorkerReady(), lc.TablesReady()), (lc.TablesReady(), lc.WorkerReady())])
def test_a_version_with_tables_is_available_only_once_both_parts_are(order: tuple[lc.Event, lc.Event]) -> None:
    life = Lifecycle("v1", needs_tables=True)
    assert kinds(run(life, lc.LoadAsked())) == [lc.SpawnWorker, lc.LoadTables]
    assert run(life, order[0]) == []
    assert life.state is S.LOADING
    assert kinds(run(life, order[1])) == [lc.BecameAvailable]
    assert life.state is S.AVAILABLE


def test_tables_unload_only_when_the_version_ends_after_its_last_request() -> None:
    life = Lifecycle("v1", needs_tables=True)
    actions = run(life, lc.LoadAsked(), lc.WorkerReady(), lc.TablesReady(), lc.UnloadAsked())
    assert lc.UnloadTables() not in actions
    assert kinds(run(life, lc.Drained())) == [lc.DisconnectWorker]
    assert kinds(run(life, lc.WorkerExited(0, True))) == [lc.FailRequests, lc.UnloadTables, lc.Ended]


def test_failed_tables_fail_the_load_and_stop_the_worker() -> None:
    life = Lifecycle("v2", needs_tables=True)
    run(life, lc.LoadAsked())
    actions = run(life, lc.TablesFailed("vocab.txt does not exist"))
    assert kinds(actions) == [lc.Terminate]
    assert life.state is S.UNLOADING
    assert run(life, lc.WorkerReady()) == []  # too late: it is on its way out
    assert kinds(run(life, lc.WorkerExited(-15, True))) == [lc.FailRequests, lc.UnloadTables, lc.Ended]
    assert life.failed and "vocab.txt does not exist" in life.error


def test_failed_tables_after_the_worker_is_ready_disconnect_it() -> None:
    life = Lifecycle("v2", needs_tables=True)
    run(life, lc.LoadAsked(), lc.WorkerReady())
    assert kinds(run(life, lc.TablesFailed("corrupt"))) == [lc.DisconnectWorker]


def test_a_model_that_does_not_load_ends_with_the_workers_error_and_no_restart() -> None:
    life = Lifecycle("v1")
    run(life, lc.LoadAsked())
    actions = run(life, lc.WorkerExited(4, restartable=False, error="no saved_model.pb"))
    assert lc.RestartWorker() not in actions and lc.Ended() in actions
    assert life.failed and life.error == "no saved_model.pb"


def test_a_worker_that_dies_while_serving_restarts_and_the_version_comes_back() -> None:
    life = Lifecycle("v1", needs_tables=True)
    run(life, lc.LoadAsked(), lc.WorkerReady(), lc.TablesReady())
    actions = run(life, lc.WorkerExited(-9, True))
    assert kinds(actions) == [lc.FailRequests, lc.RestartWorker]
    assert life.state is S.LOADING and life.worker is Replica.RESTARTING
    assert run(life, lc.WorkerStarted()) == []
    assert kinds(run(life, lc.WorkerReady())) == [lc.BecameAvailable]  # its tables stayed loaded


def test_a_silent_worker_is_terminated_and_its_requests_failed() -> None:
    life = Lifecycle("v1")
    run(life, lc.LoadAsked(), lc.WorkerReady())
    assert kinds(run(life, lc.WorkerSilent("no heartbeat for 3.1 s"))) == [lc.Terminate, lc.FailRequests]
    assert life.state is S.LOADING
    assert kinds(run(life, lc.WorkerExited(-15, True))) == [lc.FailRequests, lc.RestartWorker]


def test_a_worker_too_slow_to_load_fails_the_version() -> None:
    life = Lifecycle("v1")
    run(life, lc.LoadAsked())
    run(life, lc.WorkerSilent("not ready after 600 s", load_error="loading took longer than 600 s"))
    run(life, lc.WorkerExited(-15, True))
    assert life.failed and life.error == "loading took longer than 600 s"


def test_unloading_while_a_restart_waits_ends_at_once() -> None:
    life = Lifecycle("v1")
    run(life, lc.LoadAsked(), lc.WorkerReady(), lc.WorkerExited(1, True))
    assert kinds(run(life, lc.UnloadAsked())) == [lc.CancelRestart, lc.Ended]
    assert life.state is S.END and not life.failed


def test_unloading_a_loading_version_stops_its_worker_without_waiting() -> None:
    life = Lifecycle("v1")
    run(life, lc.LoadAsked())
    assert kinds(run(life, lc.UnloadAsked())) == [lc.Terminate]
    assert kinds(run(life, lc.WorkerExited(-15, True))) == [lc.FailRequests, lc.Ended]


def test_a_worker_that_ignores_its_disconnect_is_terminated_after_the_grace() -> None:
    life = Lifecycle("v1")
    run(life, lc.LoadAsked(), lc.WorkerReady(), lc.UnloadAsked(), lc.Drained())
    assert kinds(run(life, lc.GraceExpired())) == [lc.Terminate]


def test_a_version_never_started_ends_on_unload_and_end_is_final() -> None:
    life = Lifecycle("v1")
    assert kinds(run(life, lc.UnloadAsked())) == [lc.Ended]
    for event in (lc.LoadAsked(), lc.WorkerReady(), lc.TablesReady(), lc.Drained(), lc.WorkerExited(0, True)):
        assert run(life, event) == []
    assert life.state is S.END


def test_a_swap_with_tables_driven_by_the_policy_never_leaves_the_model_without_an_available_version() -> None:
    """Versions 1 then 2, both with tables, under the availability-preserving policy: the
    policy's steps and the processes' events interleave as in the broker."""
    lives = {1: Lifecycle("v1", needs_tables=True)}
    run(lives[1], lc.LoadAsked(), lc.TablesReady(), lc.WorkerReady())
    aspired = {2}
    available_throughout = True
    log: list[str] = []
    pending_events = {2: [lc.WorkerReady(), lc.TablesReady()]}
    for _ in range(20):
        snapshots = [VersionSnapshot(n, life.state, life.failed) for n, life in lives.items()]
        step = next_action(snapshots, aspired)
        if isinstance(step, Load):
            lives[step.version] = Lifecycle(f"v{step.version}", needs_tables=True)
            log += [type(a).__name__ for a in run(lives[step.version], lc.LoadAsked())]
        elif isinstance(step, Unload):
            run(lives[step.version], lc.UnloadAsked())
            log += [type(a).__name__ for a in run(lives[step.version], lc.Drained())]
            log += [type(a).__name__ for a in run(lives[step.version], lc.WorkerExited(0, True))]
        elif pending_events.get(2):
            log += [type(a).__name__ for a in run(lives[2], pending_events[2].pop(0))]
        else:
            break
        available_throughout &= any(life.state is S.AVAILABLE for life in lives.values())
    assert available_throughout
    assert lives[1].state is S.END and lives[2].state is S.AVAILABLE
    # version 2's tables load before it is available; version 1's go after its worker.
    assert log.index("LoadTables") < log.index("BecameAvailable") < log.index("DisconnectWorker") < log.index("UnloadTables")


def test_shutdown_of_every_state_reaches_end() -> None:
    for events in ([], [lc.LoadAsked()], [lc.LoadAsked(), lc.WorkerReady()], [lc.LoadAsked(), lc.WorkerReady(), lc.WorkerExited(1, True)]):
        life = Lifecycle("v", needs_tables=True)
        run(life, *events)
        actions = run(life, lc.UnloadAsked(), lc.Drained())
        if life.state is not S.END:
            actions += run(life, lc.WorkerExited(0, True))
        assert life.state is S.END, events
        assert lc.Ended() in actions


# --- replicas: one worker per device (--devices) ---

def test_replicas_all_ready_before_available_then_one_lost_is_covered_by_the_other() -> None:
    life = Lifecycle("v1", replicas=2)
    assert run(life, lc.LoadAsked()) == [lc.SpawnWorker(0), lc.SpawnWorker(1)]
    assert run(life, lc.WorkerReady(1)) == [] and life.state is S.LOADING  # every device loads first
    assert kinds(run(life, lc.WorkerReady(0))) == [lc.BecameAvailable]
    # One dies: its batches go to the other, it restarts, the version keeps serving.
    assert run(life, lc.WorkerExited(-9, True, replica=1)) == [lc.Requeue(1), lc.RestartWorker(1)]
    assert life.state is S.AVAILABLE and life.workers == [Replica.READY, Replica.RESTARTING]
    # The other dies too: nothing left to serve, so 503 and LOADING until one is back.
    actions = run(life, lc.WorkerExited(-9, True, replica=0))
    assert kinds(actions) == [lc.FailRequests, lc.RestartWorker] and actions[0] == lc.FailRequests(actions[0].message)
    assert life.state is S.LOADING
    run(life, lc.WorkerStarted(1))
    assert kinds(run(life, lc.WorkerReady(1))) == [lc.BecameAvailable]  # one is enough once it has served
    assert run(life, lc.WorkerStarted(0), lc.WorkerReady(0)) == []
    assert life.workers == [Replica.READY, Replica.READY]


def test_a_silent_replica_is_terminated_and_its_batches_move() -> None:
    life = Lifecycle("v1", replicas=2)
    run(life, lc.LoadAsked(), lc.WorkerReady(0), lc.WorkerReady(1))
    assert run(life, lc.WorkerSilent("no heartbeat for 10 s", replica=0)) == [
        lc.Terminate("no heartbeat for 10 s", 0), lc.Requeue(0)]
    assert life.state is S.AVAILABLE
    assert run(life, lc.WorkerExited(-15, True, replica=0)) == [lc.Requeue(0), lc.RestartWorker(0)]


def test_a_replica_that_cannot_load_fails_the_version_and_stops_the_others() -> None:
    life = Lifecycle("v1", replicas=3)
    run(life, lc.LoadAsked(), lc.WorkerReady(2))
    actions = run(life, lc.WorkerExited(4, False, "no such op", replica=0))
    assert actions == [lc.Terminate("no such op", 1, stuck=False), lc.DisconnectWorker(2)]  # loading, not stuck
    assert life.state is S.UNLOADING
    assert run(life, lc.WorkerExited(-15, True, replica=1)) == [lc.FailRequests("v1 was unloaded", 1)]
    assert kinds(run(life, lc.WorkerExited(0, True, replica=2))) == [lc.FailRequests, lc.Ended]
    assert life.failed and life.error == "no such op"


def test_unloading_replicas_go_together_and_the_version_ends_with_the_last() -> None:
    life = Lifecycle("v1", replicas=2)
    run(life, lc.LoadAsked(), lc.WorkerReady(0), lc.WorkerReady(1), lc.UnloadAsked())
    assert run(life, lc.Drained()) == [lc.DisconnectWorker(0), lc.DisconnectWorker(1)]
    assert run(life, lc.WorkerExited(0, True, replica=1)) == [lc.FailRequests("v1 was unloaded", 1)]
    assert life.state is S.UNLOADING
    assert run(life, lc.GraceExpired()) == [lc.Terminate("still running after unload", 0)]
    assert kinds(run(life, lc.WorkerExited(0, True, replica=0))) == [lc.FailRequests, lc.Ended]
    assert life.state is S.END and not life.failed


def test_a_replica_that_stops_loading_after_serving_leaves_the_others_serving() -> None:
    life = Lifecycle("v1", replicas=2)
    run(life, lc.LoadAsked(), lc.WorkerReady(0), lc.WorkerReady(1))
    assert run(life, lc.WorkerExited(4, False, "out of memory", replica=1)) == [lc.Requeue(1)]
    assert life.state is S.AVAILABLE and life.workers == [Replica.READY, Replica.NONE]


def test_a_worker_that_dies_of_a_fault_running_batches_stays_available_and_restarts_at_once() -> None:
    life = Lifecycle("v1")
    run(life, lc.LoadAsked(), lc.WorkerReady())
    actions = run(life, lc.WorkerExited(-6, True, on_requests=True))
    assert actions == [lc.Requeue(0, crashed=True), lc.RestartWorker(0, at_once=True)]
    assert life.state is S.AVAILABLE, "its requests wait for the restart instead of failing"
    assert life.workers == [Replica.RESTARTING]
    run(life, lc.WorkerStarted())
    assert kinds(run(life, lc.WorkerReady())) == []  # back: nothing to announce, it never stopped serving
    assert life.state is S.AVAILABLE and life.workers == [Replica.READY]
    # Without batches in flight, a death says nothing of a request: 503 and the back-off, as before.
    actions = run(life, lc.WorkerExited(-6, True))
    assert kinds(actions) == [lc.FailRequests, lc.RestartWorker] and not actions[1].at_once  # type: ignore[attr-defined]
    assert life.state is S.LOADING
