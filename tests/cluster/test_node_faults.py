"""Node faults on a multi-node cluster: a node that hosts a unit is removed, gracefully or by SIGKILL,
in the middle of training. The unit restarts on a spare bundle of another node from a snapshot replica
held on yet another node, and the final state equals a fault-free run bit for bit.

The cluster keeps Ray's own health checks: a SIGKILLed node is declared dead only after about 15 s,
so recovery must find the node dead by itself (its raylet refuses connections) to treat every unit of
the node as lost together, rather than replacing one unit onto what looks like a live node."""

from __future__ import annotations

import time

import pytest
import torch
from helpers import tiny_config
from ray.cluster_utils import Cluster
from ray.util.placement_group import placement_group_table

import zetta_ray as zr

pytestmark = pytest.mark.cluster

STEPS = 5
FAULT_STEP = 2


@pytest.fixture(scope="module")
def npu_cluster(start_nodes, one_thread):
    """Head (1 CPU, no npu) and three nodes with 2 npu each; Ray's health checks (see the docstring)."""
    nodes = start_nodes(3, units={"npu": 2}, system_config=None)
    return nodes.cluster, nodes.workers


def _train(fault=None, after_step=None) -> tuple[dict[str, torch.Tensor], list, dict]:
    """Train STEPS steps; ``fault(dm)`` runs in FAULT_STEP between forward and backward,
    ``after_step(dm, step)`` after every optimizer step."""
    cfg = tiny_config(n_experts=4)
    torch.manual_seed(0)
    model = zr.MoETransformer(cfg)
    request = zr.SliceRequest(units=2, kind="npu", spares=1)
    with zr.parallelize(model, zr.ExpertParallel(degree=2), slice=request) as dm:
        opt = dm.optimizer(torch.optim.AdamW, lr=1e-2)
        for step in range(STEPS):
            b = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(step % 2))
            opt.zero_grad()
            _, loss = dm(b[:, :-1], b[:, 1:])
            if fault is not None and step == FAULT_STEP:
                fault(dm)
            loss.backward()
            opt.step()
            if after_step is not None:
                after_step(dm, step)
        return dm.state_dict(), dm.recoveries, dm.placement


@pytest.fixture(scope="module")
def fault_free(npu_cluster):
    state, recoveries, _ = _train()
    assert recoveries == []
    return state


def _remove_node_of_unit(cluster: Cluster, workers: list, dm, unit: int, graceful: bool) -> tuple[str, set]:
    """Remove the node that hosts ``unit``; return its id and every unit it hosted."""
    node_id = next(p["node_id"] for p in dm.placement.values() if p["unit"] == unit)
    hosted = {p["unit"] for p in dm.placement.values() if p["node_id"] == node_id}
    for u in hosted:
        replicas = {r.node for r in dm.faults.acked.get(u, [])}
        assert replicas and node_id not in replicas  # its snapshots live on other nodes
    victim = next(w for w in workers if w.node_id == node_id)
    cluster.remove_node(victim, allow_graceful=graceful)
    workers.remove(victim)
    return node_id, hosted


@pytest.mark.parametrize("graceful", [True, False], ids=["graceful", "sigkill"])
def test_node_removed_mid_step(npu_cluster, fault_free, graceful):
    c, workers = npu_cluster
    lost = {}

    def remove(dm):
        lost["node"], lost["units"] = _remove_node_of_unit(c, workers, dm, unit=0, graceful=graceful)
        lost["faults"] = dm.faults

    start = time.monotonic()
    state, recoveries, placement = _train(remove)
    for key in fault_free:
        assert torch.equal(state[key], fault_free[key]), key
    assert sorted(r.unit for r in recoveries) == sorted(lost["units"])  # every unit of the node, once
    assert recoveries[0].action == "REPLACE_ON_SPARE"  # the reserved spare is used first
    for r in recoveries:
        assert r.kind == "node" and r.node != lost["node"]
        assert r.restored_step >= FAULT_STEP  # at most the unfinished step is redone
    if not graceful:  # the cluster had not declared it dead yet: the recovery's own probe found it
        assert lost["node"] in lost["faults"].dead_nodes
    assert all(p["node_id"] != lost["node"] for p in placement.values()), "placement shows where units are"
    assert time.monotonic() - start < 120
    deadline = time.monotonic() + 20  # nothing left behind: every slice removed (asynchronously)
    while any(g["state"] != "REMOVED" for g in placement_group_table().values()):
        assert time.monotonic() < deadline, placement_group_table()
        time.sleep(0.2)


def test_node_lost_between_steps_recovers_before_the_cluster_declares_it_dead(npu_cluster, fault_free):
    """SIGKILL of a unit's node right after an optimizer step, while that step's snapshots are still
    being copied from it to pools on other nodes. Those copies can never land and Ray fails them only
    when its health checks declare the node dead (about 15 s here); recovery must not wait for that:
    the next step, recovery included (a fresh worker importing torch, ~3-5 s), ends well before."""
    c, workers = npu_cluster
    workers.append(c.add_node(num_cpus=1, resources={"npu": 2}))  # earlier tests removed nodes
    c.wait_for_nodes()
    lost, clock = {}, {}

    def remove_after_step(dm, step):
        if step == FAULT_STEP:
            lost["node"], lost["units"] = _remove_node_of_unit(c, workers, dm, unit=0, graceful=False)
            clock["killed"] = time.monotonic()
        elif step == FAULT_STEP + 1:
            clock["next_step_done"] = time.monotonic()

    state, recoveries, _ = _train(after_step=remove_after_step)
    for key in fault_free:
        assert torch.equal(state[key], fault_free[key]), key
    assert sorted(r.unit for r in recoveries) == sorted(lost["units"])
    assert all(r.kind == "node" and r.node != lost["node"] for r in recoveries)
    took = clock["next_step_done"] - clock["killed"]
    assert took < 12.0, f"the step after the node's loss took {took:.1f} s: recovery waited for Ray's verdict"
