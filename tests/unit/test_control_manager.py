"""The fault manager and its recovery against fakes of its seams (``control/seams.py``), without Ray.

Each test drives a ``FaultManager`` through ``FakeRuntime`` (which journals, sends and waits for calls as
``ExpertRuntime`` does), injects one fault into the fakes, and asserts the decision taken, the calls made
(from ``FakeCluster.calls`` and each unit's ``received``) and the state afterwards. The same paths on a
real cluster are covered by tests/chaos and tests/cluster; these run in milliseconds.
"""

from __future__ import annotations

from typing import Any

import pytest
from control_fakes import FakeCluster, FakeRuntime

from zetta_ray.checkpoint import TrickleCheckpoint
from zetta_ray.control.manager import FaultManager
from zetta_ray.errors import RecoveryFailed


def start(
    nodes: tuple[str, ...] = ("a", "b", "c"),
    unit_nodes: tuple[str, ...] = ("a", "b", "c"),
    spares: list[tuple[dict[str, Any], str]] = (),
    **config: Any,
) -> tuple[FakeCluster, FakeRuntime, FaultManager]:
    """A manager over fake nodes and units, attached and with its step-0 snapshot stored (as
    ``DistributedModule`` starts one)."""
    cluster = FakeCluster(list(nodes))
    runtime = FakeRuntime(cluster, list(unit_nodes))
    manager = FaultManager(
        TrickleCheckpoint(**config), unit_nodes=list(unit_nodes), spares=spares, cluster=cluster
    )
    manager.attach(runtime)
    manager.snapshot(runtime, wait=True)
    return cluster, runtime, manager


def replayed(unit: Any) -> list[tuple[str, int]]:
    """The calls ``unit`` (a replacement) received after its restores: (method, step)."""
    return [
        (m, a[0][0] if m != "step" else a[0])
        for m, a in unit.received
        if m in ("forward", "backward", "step")
    ]


def restores(unit: Any) -> int:
    return sum(m == "restore" for m, _ in unit.received)


def test_fault_free_steps_commit_store_off_node_and_trim_the_journal():
    cluster, runtime, manager = start()
    for _ in range(3):
        runtime.train_step()
    runtime.forward()  # collects nothing new; the step-3 puts are in flight until the next step
    assert manager.committed_step == 2
    for u, node in enumerate(runtime.unit_nodes):
        # R=2 replicas per snapshot, never on the unit's own node while other nodes have pools
        assert {r.node for r in manager.acked[u] if r.step == 2} == {"a", "b", "c"} - {node}
    # steps 1.. are gradient records on the step-0 full snapshot (full_every=8)
    assert ("gradient_record", "unit0", 1) in cluster.calls
    assert [r.start for r in manager.acked[0]] == [0] * len(manager.acked[0])
    assert manager.log.steps(0) == [2, 3]  # the calls before the committed step are dropped
    assert manager.events == []
    assert manager.dead_pools == set()


@pytest.mark.parametrize("phase", ["forward", "backward", "optimizer"])
def test_unit_dies_in_a_phase_is_replaced_in_place_restored_and_replayed(phase):
    cluster, runtime, manager = start()
    for _ in range(3):
        runtime.train_step()
    dead = runtime.units[1]
    if phase == "forward":
        dead.die()  # between two steps
        runtime.forward()
        expected = [("forward", 3)]
    elif phase == "backward":
        runtime.forward()
        dead.dead = True  # with its backward in flight
        runtime.backward()
        expected = [("forward", 3), ("backward", 3)]
    else:
        runtime.forward()
        runtime.backward()
        dead.dead = True  # with its optimizer step in flight
        runtime.step_experts()  # fire and forget: the fault shows at the next wait
        runtime.forward()
        expected = [("forward", 3), ("backward", 3), ("step", 3), ("forward", 4)]

    (event,) = manager.events
    assert (event.unit, event.phase, event.step, event.action) == (1, phase, 3, "REPLACE_ON_NODE")
    assert event.node == "b"  # its own bundle on its live node
    # the step-3 snapshot landed before the fault: restored from it, the journal since replayed
    assert event.restored_step == 3
    new = runtime.units[1]
    assert new is not dead and not new.dead
    assert restores(new) == 4  # the full snapshot of step 0, then the records of steps 1..3
    assert replayed(new) == expected  # in order, each once: the step-2 optimizer step is not re-sent
    assert event.replayed_calls == len(expected)
    assert ("kill", "unit1") in cluster.calls
    assert cluster.calls.count(("start_unit", 1)) == 1
    assert manager.unit_nodes == ["a", "b", "c"]
    # the other units got every call once: nothing was re-sent to them
    assert [m for m, _ in runtime.units[0].received].count("forward") == (5 if phase == "optimizer" else 4)
    # the replacement's state is snapshotted again at once when it was replayed past its snapshot
    snapshots_after = [m for m, a in new.received if m in ("snapshot", "gradient_record")]
    assert snapshots_after == (["snapshot"] if phase == "optimizer" else [])
    runtime.train_step()  # and training goes on
    assert len(manager.events) == 1


def test_unit_dies_while_making_its_snapshot_restores_the_previous_one():
    cluster, runtime, manager = start()
    for _ in range(2):
        runtime.train_step()
    runtime.units[1].hold_snapshots = True
    runtime.train_step()  # the step-3 snapshot of unit 1 is being made ...
    runtime.units[1].die()  # ... when the unit dies
    runtime.forward()

    (event,) = manager.events
    assert (event.unit, event.phase, event.restored_step) == (1, "forward", 2)
    assert replayed(runtime.units[1]) == [("forward", 2), ("backward", 2), ("step", 2), ("forward", 3)]
    assert all(r.step < 3 for r in manager.acked[1])  # the lost snapshot is not counted as stored
    assert manager.committed_step == 2
    # the blob failed, not the pools: both answered a ping and none was replaced
    assert manager.dead_pools == set()
    assert [c[1] for c in cluster.calls if c[0] == "start_pool"] == ["pool-a-0", "pool-b-1", "pool-c-2"]
    assert {c[1] for c in cluster.calls if c[0] == "ping" and len(c) == 2} >= {"pool-c-2", "pool-a-0"}
    # the replacement's state is stored again at once as a full snapshot of step 3 (not a record on
    # the lost one), and its records build on that
    assert ("snapshot", (3, False)) in runtime.units[1].received
    runtime.backward()
    runtime.step_experts()
    runtime.train_step()  # its after_step takes in the step-4 round
    assert manager.committed_step == 4
    assert {(r.step, r.start) for r in manager.acked[1]} >= {(3, 3), (4, 3)}


def test_dead_pool_is_replaced_on_its_node_and_never_restored_from():
    cluster, runtime, manager = start()
    for _ in range(2):
        runtime.train_step()
    cluster.pools["pool-a-0"].dead = True
    runtime.train_step()  # the step-3 puts to pool-a-0 are collected at the next step
    runtime.train_step()

    assert manager.dead_pools == {"pool-a-0"}
    assert ("start_pool", "pool-a-3", "a") in cluster.calls
    assert manager.pool_nodes["pool-a-3"] == "a"
    # units 1 and 2 stored on pool-a-0; their next snapshots go to the new pool, and are full
    assert all(r.pool != "pool-a-0" for u in (1, 2) for r in manager.acked[u])
    assert any(r.pool == "pool-a-3" and r.start == r.step for r in manager.acked[1])

    runtime.units[1].die()
    runtime.forward()
    (event,) = manager.events
    assert event.unit == 1
    gets = [c for c in cluster.calls if c[0] == "get"]
    assert gets and all(pool != "pool-a-0" for _, pool, *_ in gets)


def test_node_death_replaces_all_its_units_at_once_on_a_spare_and_another_node():
    nodes = ("a", "b", "c", "d")
    spare = ({"node": "d", "num_cpus": 1}, "d")
    cluster, runtime, manager = start(nodes, unit_nodes=("a", "b", "b", "c"), spares=[spare])
    for _ in range(2):
        runtime.train_step()
    cluster.kill_node("b", runtime.units)  # its raylet refuses; the cluster has not noticed yet
    runtime.forward()

    events = {e.unit: e for e in manager.events}
    assert sorted(events) == [1, 2]
    assert ("probe", "b") in cluster.calls
    assert "b" in manager.dead_nodes
    assert {p for p, n in manager.pool_nodes.items() if n == "b"} <= manager.dead_pools
    assert events[1].action == "REPLACE_ON_SPARE" and events[1].node == "d"
    assert events[2].action == "REPLACE_ON_NODE" and events[2].node not in ("b", "d")
    assert manager.spares == []
    assert "b" not in manager.unit_nodes
    # the second replacement was pinned to its node, asking for no CPU (the bundle's are gone)
    ((_, overrides),) = [s for s in runtime.started if "scheduling_strategy" in s[1]]
    assert overrides["num_cpus"] == 0 and overrides["scheduling_strategy"] == ("affinity", events[2].node)
    # both replacements started before either was waited for (a node fault costs about one unit's)
    starts = [i for i, c in enumerate(cluster.calls) if c[0] == "start_unit"]
    first_replay = next(
        i for i, c in enumerate(cluster.calls) if c[0] == "forward" and c[1].startswith("unit1.")
    )
    assert len(starts) == 2 and max(starts) < first_replay
    for u in (1, 2):
        assert replayed(runtime.units[u])[-1] == ("forward", 2)
        assert all(r.node != "b" for r in manager.acked[u] if r.step >= events[u].restored_step)
    runtime.train_step()
    assert len(manager.events) == 2


def test_replacement_that_dies_during_restore_is_killed_and_started_again():
    cluster, runtime, manager = start()
    for _ in range(2):
        runtime.train_step()
    runtime.die_on_arrival = {1}
    runtime.units[1].die()
    runtime.forward()

    (event,) = manager.events
    assert event.unit == 1
    assert cluster.calls.count(("start_unit", 1)) == 2
    assert ("kill", "unit1.1") in cluster.calls  # the first replacement, dead on arrival
    assert runtime.units[1].name == "unit1.2" and not runtime.units[1].dead
    assert manager.dead_pools == set()  # its pool answered: the pool was not blamed
    assert replayed(runtime.units[1]) == [("forward", 2)]


def test_no_readable_replica_fails_the_recovery_and_kills_every_replacement():
    cluster, runtime, manager = start()
    for _ in range(2):
        runtime.train_step()
    runtime.forward()
    for pool in ("pool-a-0", "pool-c-2"):  # the pools live, but hold nothing of unit 1 any more
        held = cluster.pools[pool].held
        for key in [k for k in held if k[0] == 1]:
            del held[key]
    runtime.units[1].die()

    with pytest.raises(RecoveryFailed, match="unit 1") as raised:
        runtime.backward()
    assert "no replica" in str(raised.value)
    # one replacement per replica tried; each was killed when its restore failed
    replacements = [u for u in runtime.started if u[0] == 1]
    assert len(replacements) == 2
    killed = {c[1] for c in cluster.calls if c[0] == "kill"}
    assert {"unit1", "unit1.1", "unit1.2"} <= killed
    assert manager.dead_pools == set()  # the pools answered: not blamed, only their copies forgotten
    assert manager.acked.get(1, []) == []
    assert manager.events == []
