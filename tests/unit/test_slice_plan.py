"""Slice planning without Ray: unit choice, equal expert shares, spares, and infeasible requests."""

from __future__ import annotations

import numpy as np
import pytest

from zetta_ray.errors import ConfigError, InfeasibleSliceError
from zetta_ray.placement import Topology, Workload, zipf_load
from zetta_ray.placement.slice_plan import SliceRequest, plan_replica_slice, plan_slice

pytestmark = pytest.mark.unit


def _nodes(*npus: int) -> Topology:
    """One node per entry, each with that many npu units and 4 CPUs."""
    nodes = [
        {
            "NodeID": f"n{i}",
            "Alive": True,
            "Resources": {"CPU": 4.0, "npu": float(k), "memory": 64e9, "object_store_memory": 8e9},
        }
        for i, k in enumerate(npus)
    ]
    return Topology.from_ray_nodes(nodes)


def _workload(load=None) -> Workload:
    return Workload(
        n_experts=8, n_layers=2, top_k=2, d_model=64, d_ff=128, tokens_per_step=4096, replicas=0, load=load
    )


def test_prefers_npu_and_gives_every_unit_an_equal_share_of_every_layer():
    t = _nodes(4, 4)
    plan = plan_slice(t, _workload(), SliceRequest(units=4))
    assert plan.kind == "npu"
    assert len(plan.unit_U) == 4 and all(t.kinds[t.unit_kind_U[u]] == "npu" for u in plan.unit_U)
    for units in plan.unit_LE:
        assert sorted(np.bincount(units, minlength=4).tolist()) == [2, 2, 2, 2]


def test_skewed_load_is_balanced_across_units():
    load = zipf_load(8, 1.2)
    plan = plan_slice(_nodes(4, 4), _workload(load), SliceRequest(units=4))
    per_unit = np.zeros(4)
    for e, u in enumerate(plan.unit_LE[0]):
        per_unit[u] += load[e]
    # LPT with equal counts: the heaviest expert shares its unit with the lightest ones.
    assert per_unit.max() <= load.max() + load[np.argsort(load)[:1]].sum() + 1e-12
    heaviest_unit = plan.unit_LE[0][int(np.argmax(load))]
    assert sum(1 for u in plan.unit_LE[0] if u == heaviest_unit) == 2


def test_spares_go_to_the_node_the_slice_uses_least():
    t = _nodes(4, 4)
    plan = plan_slice(t, _workload(), SliceRequest(units=3, spares=1))
    used_nodes = [int(t.unit_node_U[u]) for u in plan.unit_U]
    spare_node = int(t.unit_node_U[plan.spare_U[0]])
    assert used_nodes.count(spare_node) == min(used_nodes.count(n) for n in (0, 1))
    assert set(plan.spare_U).isdisjoint(plan.unit_U)


def test_plan_is_deterministic():
    t = _nodes(2, 4, 2)
    a = plan_slice(t, _workload(zipf_load(8, 1.0)), SliceRequest(units=4, spares=2))
    b = plan_slice(t, _workload(zipf_load(8, 1.0)), SliceRequest(units=4, spares=2))
    assert (a.unit_U, a.spare_U, a.unit_LE) == (b.unit_U, b.spare_U, b.unit_LE)


def test_too_many_units_names_what_is_missing_and_the_largest_alternative():
    with pytest.raises(InfeasibleSliceError) as err:
        plan_slice(_nodes(2, 2), _workload(), SliceRequest(units=5, kind="npu", spares=1))
    msg = str(err.value)
    assert "needs 6 npu units (5 + 1 spares)" in msg and "have 4: 2 npu missing" in msg
    assert "SliceRequest(units=3, kind='npu', spares=1)" in msg and "{'npu': 2} more" in msg


def test_a_kind_the_cluster_lacks_suggests_one_it_has():
    with pytest.raises(InfeasibleSliceError, match=r"2 tpu missing .*kind='(npu|cpu)'"):
        plan_slice(_nodes(2, 2), _workload(), SliceRequest(units=2, kind="tpu"))


def test_request_validation():
    with pytest.raises(ConfigError, match="units"):
        SliceRequest(units=0)
    with pytest.raises(ConfigError, match="spares"):
        SliceRequest(units=1, spares=-1)


def _racked(racks: list[str], npus: int = 2) -> Topology:
    """One node per entry of ``racks`` (its rack's name), each with ``npus`` npu units."""
    nodes = [
        {
            "NodeID": f"n{i}",
            "Alive": True,
            "Labels": {"rack": rack},
            "Resources": {"CPU": 4.0, "npu": float(npus), "memory": 64e9, "object_store_memory": 8e9},
        }
        for i, rack in enumerate(racks)
    ]
    return Topology.from_ray_nodes(nodes)


def test_data_parallel_replicas_spread_over_racks_then_nodes():
    t = _racked(["a", "a", "b"])
    plan = plan_replica_slice(t, SliceRequest(units=3, spares=1))
    nodes = [int(t.unit_node_U[u]) for u in plan.unit_U]
    racks = [int(t.unit_rack_U[u]) for u in plan.unit_U]
    assert plan.kind == "npu" and plan.unit_LE == () and plan.placement is None
    assert len(set(racks[:2])) == 2  # the first two replicas in different racks
    assert len(set(nodes)) == 3  # no two replicas on one node while nodes are left
    spare_node = int(t.unit_node_U[plan.spare_U[0]])
    assert spare_node in nodes and racks.count(int(t.unit_rack_U[plan.spare_U[0]])) == 1  # the thin rack
    assert plan == plan_replica_slice(t, SliceRequest(units=3, spares=1))  # the same every time
    with pytest.raises(InfeasibleSliceError, match="needs 7"):
        plan_replica_slice(t, SliceRequest(units=7, kind="npu"))


def test_data_parallel_pipelines_pack_their_stages_and_spread_the_pipelines():
    t = _racked(["a", "a", "b"])  # 2 units a node
    plan = plan_replica_slice(t, SliceRequest(units=4, spares=1), spread=True, group=2)
    nodes = [int(t.unit_node_U[u]) for u in plan.unit_U]
    racks = [int(t.unit_rack_U[u]) for u in plan.unit_U]
    assert nodes[0] == nodes[1] and nodes[2] == nodes[3]  # a pipeline's two stages share a node
    assert racks[0] != racks[2]  # the two pipelines in different racks
    assert len(plan.spare_U) == 1 and plan.spare_U[0] not in plan.unit_U
    packed = plan_replica_slice(t, SliceRequest(units=4), spread=False)
    assert [int(t.unit_node_U[u]) for u in packed.unit_U] == [0, 0, 1, 1]  # stages packed in node order
