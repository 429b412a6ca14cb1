"""A unit's node is removed; its snapshot, held by pools on other nodes, restores a replacement bitwise.

The building blocks are wired the way the controller wires them: ``decide_replica_nodes`` picks the
pools, the unit sends them its snapshot, ``faults_from_node_death`` and ``decide_recovery`` say where
the replacement goes and which replica it restores.
"""

from __future__ import annotations

import pytest
import ray
from helpers import UNIT_KEYS, T, assert_same_units, load_units, train_units, unit_actor
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from zetta_ray.checkpoint import encode_snapshot
from zetta_ray.control import (
    RecoveryAction,
    Replica,
    decide_recovery,
    decide_replica_nodes,
    faults_from_node_death,
)

pytestmark = pytest.mark.cluster


def _on(node_id: str) -> NodeAffinitySchedulingStrategy:
    return NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)


def test_snapshot_on_other_nodes_survives_removing_the_unit_node(ray_multinode, start_pools):
    mn = ray_multinode
    a, b = (w.node_id for w in mn.workers)
    pool_nodes = {"pool-head": mn.head, "pool-a": a, "pool-b": b}
    pools = start_pools(pool_nodes)
    doomed, survivor = unit_actor(scheduling_strategy=_on(a)), unit_actor(scheduling_strategy=_on(mn.head))
    load_units([doomed, survivor])
    assert ray.get(doomed.ping.remote(), timeout=T)["node_id"] == a
    train_units([doomed, survivor], range(3))

    chosen = decide_replica_nodes(a, pool_nodes, 2, live_nodes=mn.alive(), key=0)
    assert {n for _, n in chosen} == {mn.head, b}, "replicas never share the unit's node"
    acks = ray.get(doomed.snapshot_to.remote(3, [pools[p] for p, _ in chosen]), timeout=T)
    ray.get(acks, timeout=T)
    stored = {0: [Replica(p, n, 3) for p, n in chosen]}
    assert {ray.get(pools[p].stats.remote(), timeout=T)["node_id"] for p, _ in chosen} == {mn.head, b}

    mn.remove(mn.workers[0])  # node a: the unit, its ray.put of the blob and pool-a go with it
    with pytest.raises(ray.exceptions.RayActorError):  # no race: its node is gone
        ray.get(doomed.ping.remote(), timeout=T)

    unit_fault, pool_fault = faults_from_node_death(
        a, units={0: UNIT_KEYS}, pools=["pool-a"], step=3, phase="forward"
    )
    live = mn.alive()
    decision = decide_recovery(
        unit_fault,
        live_nodes=live,
        replicas_by_unit=stored,
        dead_pools={"pool-a"},
        free_slots={mn.head: 1, b: 1},
    )
    assert decision.action is RecoveryAction.REPLACE_ON_NODE and decision.node in {mn.head, b}
    assert decision.restore_from.step == decision.replay_since == 3
    assert decision.restore_from.node == decision.node, "ties go to the replica on the replacement's node"
    pool_decision = decide_recovery(
        pool_fault, live_nodes=live, replicas_by_unit=stored, pools_by_node={mn.head: 1, b: 1}
    )
    assert pool_decision.action is RecoveryAction.REPLACE_POOL and pool_decision.node == min(mn.head, b)

    replacement = unit_actor(scheduling_strategy=_on(decision.node))
    blob_ref = pools[decision.restore_from.pool].get.remote(0, decision.restore_from.step)
    assert ray.get(replacement.restore.remote(blob_ref), timeout=T) == 3
    copies = ray.get([pools[p].get.remote(0, 3) for p, _ in chosen], timeout=T)
    assert encode_snapshot(copies[0]) == encode_snapshot(copies[1]), "both surviving replicas are equal"

    train_units([replacement, survivor], range(3, 5))
    assert_same_units(replacement, survivor)
    for actor in (replacement, survivor):
        ray.kill(actor)
