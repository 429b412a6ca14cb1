"""Slices on a multi-node cluster: actors land where the plan says, infeasible requests fail fast, a
removed node is planned around, and training spread over nodes still equals single-process PyTorch."""

from __future__ import annotations

import copy
import time

import pytest
import ray
import torch
from helpers import tiny_config
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

import zetta_ray as zr
from zetta_ray.errors import InfeasibleSliceError
from zetta_ray.placement.slices import live_topology

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def cluster(start_nodes, one_thread):  # the units run one thread: same reduction order, same bits
    nodes = start_nodes(2, units={"npu": 2})
    return nodes.cluster, nodes.workers


def _npu_nodes() -> set[str]:
    return {n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("npu")}


def test_units_run_on_the_nodes_their_plan_names_and_training_matches_pytorch(cluster):
    torch.manual_seed(0)
    reference = zr.MoETransformer(tiny_config())
    model = copy.deepcopy(reference)
    g = torch.Generator().manual_seed(5)
    data = [torch.randint(0, 64, (4, 17), generator=g) for _ in range(2)]
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    with zr.parallelize(model, zr.ExpertParallel(degree=4), slice=zr.SliceRequest(units=4, kind="npu")) as dm:
        placement = dm.placement
        nodes_used = {p["node_id"] for p in placement.values()}
        assert nodes_used == _npu_nodes()  # 4 npu units need both npu nodes
        actual = {u["unit"]: u["node_id"] for u in dm.unit_stats()}
        for (layer, expert), where in placement.items():
            assert actual[where["unit"]] == where["node_id"], (layer, expert)
        opt = dm.optimizer(torch.optim.AdamW, lr=1e-2)
        for step in range(6):
            b = data[step % 2]
            for m, o in ((reference, ref_opt), (dm, opt)):
                o.zero_grad()
                _, loss = m(b[:, :-1], b[:, 1:])
                loss.backward()
                o.step()
        state = dm.state_dict()
        pg_id = dm.slice.pg.id.hex()
    for key, value in reference.state_dict().items():
        assert torch.equal(state[key], value), key
    table = placement_group_table()
    assert table[pg_id]["state"] == "REMOVED"  # closing released the slice


def test_infeasible_request_fails_fast_naming_what_is_missing(cluster):
    model = zr.MoETransformer(tiny_config())
    start = time.monotonic()
    with pytest.raises(InfeasibleSliceError) as err:
        zr.parallelize(model, zr.ExpertParallel(degree=8), slice=zr.SliceRequest(units=8, kind="npu"))
    assert time.monotonic() - start < 5
    msg = str(err.value)
    assert "needs 8 npu units" in msg and "have 4" in msg and "4 npu missing" in msg
    assert "Largest feasible alternative: SliceRequest(units=4, kind='npu'" in msg
    pending = [p for p in placement_group_table().values() if p["state"] not in ("REMOVED", "CREATED")]
    assert not pending  # nothing was left pending


def test_a_second_slice_is_planned_on_the_units_the_first_left_free(cluster):
    """Two modules at once, two npu units each: the second goes to the node the first left free,
    instead of being planned onto the same units and waiting for them until its ready timeout."""
    request = zr.SliceRequest(units=2, kind="npu", ready_timeout_s=10.0)
    models = [zr.MoETransformer(tiny_config()) for _ in range(2)]
    ep = zr.ExpertParallel(degree=2)
    with (
        zr.parallelize(models[0], ep, slice=request, checkpoint=False) as first,
        zr.parallelize(models[1], ep, slice=request, checkpoint=False) as second,
    ):
        nodes = [{p["node_id"] for p in m.placement.values()} for m in (first, second)]
        assert len(nodes[0]) == len(nodes[1]) == 1 and nodes[0] | nodes[1] == _npu_nodes(), nodes
        x = torch.randint(0, 64, (2, 16))
        for m in (first, second):
            _, loss = m(x, x)
            loss.backward()


def test_a_slice_whose_units_stay_busy_fails_after_its_ready_timeout(cluster):
    """Every npu unit held by a placement group outside zetta_ray: the request is feasible on the
    cluster but not now, so it waits ``ready_timeout_s`` (not forever) and leaves no group behind."""
    held = placement_group([{"npu": 1}] * 4, strategy="SPREAD")
    assert held.wait(timeout_seconds=30)
    try:
        start = time.monotonic()
        request = zr.SliceRequest(units=2, kind="npu", ready_timeout_s=3.0)
        with pytest.raises(InfeasibleSliceError, match=r"stayed busy for 3 s.*ready_timeout_s"):
            zr.parallelize(zr.MoETransformer(tiny_config()), zr.ExpertParallel(degree=2), slice=request)
        assert 3.0 <= time.monotonic() - start < 15
        groups = [g for g in placement_group_table().values() if g["state"] not in ("REMOVED", "CREATED")]
        assert not groups, groups
    finally:
        remove_placement_group(held)


def test_removed_node_is_left_out_of_the_next_plan(cluster):
    c, workers = cluster
    gone = workers[1].node_id
    c.remove_node(workers[1])
    deadline = time.monotonic() + 30
    while gone in _npu_nodes():  # wait for the cluster to see the node go
        assert time.monotonic() < deadline, "removed node still listed as alive"
        time.sleep(0.2)
    topology = live_topology([n for n in ray.nodes() if n["Alive"]])
    assert gone not in topology.node_names
    model = zr.MoETransformer(tiny_config())
    with zr.parallelize(model, zr.ExpertParallel(degree=2), slice=zr.SliceRequest(units=2, kind="npu")) as dm:
        assert {p["node_id"] for p in dm.placement.values()} == {workers[0].node_id}
        x = torch.randint(0, 64, (2, 16))
        _, loss = dm(x, x)
        loss.backward()
