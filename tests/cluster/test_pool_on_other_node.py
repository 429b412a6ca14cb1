"""A unit's node is removed; its snapshot, held by pools on other nodes, restores a replacement bitwise.

The building blocks are wired the way the controller wires them: ``decide_replica_nodes`` picks the
pools, the unit sends them its snapshot, ``faults_from_node_death`` and ``decide_recovery`` say where
the replacement goes and which replica it restores.
"""

from __future__ import annotations

import numpy as np
import pytest
import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from zetta_ray.actors import ComputeUnitActor
from zetta_ray.actors.memory_pool import MemoryPoolActor
from zetta_ray.actors.wire import to_wire
from zetta_ray.checkpoint import encode_snapshot
from zetta_ray.control import (
    RecoveryAction,
    Replica,
    decide_recovery,
    decide_replica_nodes,
    faults_from_node_death,
)
from zetta_ray.experts import ExpertFFN

pytestmark = pytest.mark.cluster

T = 30  # seconds: the deadline of every remote call in this module
KEYS = [(0, 0), (0, 1), (1, 0)]
D = 8


def _on(node_id: str) -> NodeAffinitySchedulingStrategy:
    return NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)


def _unit(node_id: str):
    skeletons = {k: ExpertFFN(D, 16).to("meta") for k in KEYS}
    return ComputeUnitActor.options(num_cpus=0.25, scheduling_strategy=_on(node_id)).remote(0, skeletons)


def _train(units: list, steps: range) -> None:
    calls = []
    for step in steps:
        g = torch.Generator().manual_seed(step)
        for layer, experts, counts in [(0, [0, 1], [3, 3]), (1, [0], [6])]:
            x, dy = torch.randn(6, D, generator=g).numpy(), torch.randn(6, D, generator=g).numpy()
            for u in units:
                calls += [
                    u.forward.remote((step, layer, 0), experts, counts, x, True, step + 1),
                    u.backward.remote((step, layer, 0), dy, step + 1),
                ]
        calls += [u.step.remote(step, step + 1) for u in units]
    ray.get(calls, timeout=T)


def test_snapshot_on_other_nodes_survives_removing_the_unit_node(ray_multinode):
    mn = ray_multinode
    a, b = (w.node_id for w in mn.workers)
    pool_nodes = {"pool-head": mn.head, "pool-a": a, "pool-b": b}
    pools = {
        name: MemoryPoolActor.options(scheduling_strategy=_on(node)).remote(limit_bytes=2**26, name=name)
        for name, node in pool_nodes.items()
    }
    doomed, survivor = _unit(a), _unit(mn.head)
    torch.manual_seed(0)
    weights = {f"{l}.{e}.{n}": to_wire(t) for l, e in KEYS for n, t in ExpertFFN(D, 16).state_dict().items()}
    ray.get(
        [u.load_state_dict.remote(weights) for u in (doomed, survivor)]
        + [u.set_optimizer.remote(torch.optim.AdamW, {"lr": 0.02}) for u in (doomed, survivor)],
        timeout=T,
    )
    assert ray.get(doomed.ping.remote(), timeout=T)["node_id"] == a
    _train([doomed, survivor], range(3))

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
        a, units={0: KEYS}, pools=["pool-a"], step=3, phase="forward"
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

    replacement = _unit(decision.node)
    blob_ref = pools[decision.restore_from.pool].get.remote(0, decision.restore_from.step)
    assert ray.get(replacement.restore.remote(blob_ref), timeout=T) == 3
    copies = ray.get([pools[p].get.remote(0, 3) for p, _ in chosen], timeout=T)
    assert encode_snapshot(copies[0]) == encode_snapshot(copies[1]), "both surviving replicas are equal"

    _train([replacement, survivor], range(3, 5))
    sr, ss = ray.get([replacement.state_dict.remote(), survivor.state_dict.remote()], timeout=T)
    assert sr.keys() == ss.keys() and all(np.array_equal(sr[k], ss[k]) for k in sr)
    orr, os_ = ray.get(
        [replacement.optimizer_state_dict.remote(), survivor.optimizer_state_dict.remote()], timeout=T
    )
    assert all(
        np.array_equal(orr["state"][i][n], os_["state"][i][n]) for i in orr["state"] for n in orr["state"][i]
    )
    for actor in (replacement, survivor, pools["pool-head"], pools["pool-b"]):
        ray.kill(actor)
