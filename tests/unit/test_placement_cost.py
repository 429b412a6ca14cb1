"""The cost model against numbers worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import two_node_spec

import zetta_ray as zr
from zetta_ray.errors import ConfigError
from zetta_ray.placement import Tier, Topology, Workload, step_cost, zipf_load
from zetta_ray.placement.cost import SNAPSHOT, TOKENS

pytestmark = pytest.mark.unit

# node 0: unit 0 gpu (1 MFLOP/s), unit 1 npu (2 MFLOP/s); node 1: unit 2 npu (1 MFLOP/s). One rack.
TINY = two_node_spec(
    links={"node": {"bandwidth": 1e9, "latency": 1e-6}, "rack": {"bandwidth": 5e8, "latency": 2e-6}}
)


def tiny_workload(**overrides) -> Workload:
    values = dict(
        n_experts=2,
        top_k=1,
        d_model=4,
        d_ff=8,
        tokens_per_step=100,
        load=[0.75, 0.25],
        n_dense=1,
        dense_flops_per_step=1e4,
        activation_bytes=2,
        param_bytes=4,
        optimizer_slots=2,
        replicas=1,
    )
    values.update(overrides)
    return Workload(**values)


def test_per_expert_figures_by_hand():
    w = tiny_workload()
    assert w.rows_X.tolist() == [75.0, 25.0]  # tokens * top_k * load
    assert w.params_per_expert == 2 * 4 * 8
    assert w.flops_X.tolist() == [75 * 6 * 64, 25 * 6 * 64]  # forward 2*params per row, backward twice that
    assert w.edge_bytes_X.tolist() == [4 * 75 * 4 * 2, 4 * 25 * 4 * 2]  # 4 transfers of rows * d_model * 2 B
    assert w.snapshot_bytes == 64 * 4 * 3  # parameters + 2 Adam moments
    # Resident: params, grads, 2 moments, plus activations kept for backward.
    assert w.memory_X.tolist() == [64 * 4 * 4 + r * (2 * 4 + 2 * 8) * 2 for r in (75, 25)]
    assert tiny_workload(expert_memory_bytes=7).memory_X.tolist() == [7.0, 7.0]


def test_step_cost_by_hand():
    t = Topology.from_spec(TINY)
    w = tiny_workload()
    c = step_cost(
        t, w, expert_unit_X=np.array([1, 2]), dense_unit_D=np.array([0]), replica_pool_XR=[[1], [0]]
    )
    dense = 1e4 / 1e6
    # Token edges: expert 0 on the dense unit's node (NODE tier), expert 1 on the other node (RACK).
    e0, e1 = 2400 / 1e9, 800 / 5e8
    unit0 = e0 + e1 + 4 * 2e-6  # the dense port carries both edges; 4 rounds of the worst latency
    unit1 = 28800 / 2e6 + e0 + 4 * 1e-6
    unit2 = 9600 / 1e6 + e1 + 4 * 2e-6
    layer = max(unit0, unit1, unit2)
    snapshot = 768 / 5e8 + 2e-6  # both replicas cross the rack; each port sends one
    assert c.dense_compute_s == pytest.approx(dense)
    assert c.layer_time_s_L.tolist() == pytest.approx([layer])
    assert c.layer_bottleneck_unit_L.tolist() == [1]
    assert c.snapshot_s == pytest.approx(snapshot)
    assert c.step_time_s == pytest.approx(dense + layer + snapshot)
    assert c.expert_compute_s_X.tolist() == pytest.approx([28800 / 2e6, 9600 / 1e6])

    edges = c.edges
    tokens = edges.kind_Y == TOKENS
    assert edges.src_Y[tokens].tolist() == [0, 0] and edges.dst_Y[tokens].tolist() == [1, 2]
    assert edges.tier_Y[tokens].tolist() == [Tier.NODE, Tier.RACK]
    assert edges.bytes_Y[tokens].tolist() == [2400, 800]
    snap = edges.kind_Y == SNAPSHOT
    assert edges.dst_Y[snap].tolist() == [1, 0] and edges.bytes_Y[snap].tolist() == [768, 768]
    assert edges.bytes_by_tier() == {"NODE": 2400.0, "RACK": 800.0 + 2 * 768.0}
    assert edges.expert_bytes(2, TOKENS).tolist() == [2400, 800]
    assert c.to_dict()["bytes_by_tier"]["RACK"] == 2336.0


def test_colocated_dense_and_expert_move_nothing():
    t = Topology.from_spec(TINY)
    w = tiny_workload(n_experts=1, load=None, replicas=0)
    c = step_cost(t, w, expert_unit_X=np.array([0]), dense_unit_D=np.array([0]))
    assert c.edges.tier_Y.tolist() == [Tier.UNIT]
    assert c.layer_time_s_L[0] == pytest.approx(100 * 6 * 64 / 1e6), "compute only: no bytes, no latency"
    assert c.snapshot_s == 0.0


def test_snapshot_every_amortises_and_pool_bandwidth_can_dominate():
    t = Topology.from_spec(TINY)
    w = tiny_workload(snapshot_every=4)
    c = step_cost(
        t, w, expert_unit_X=np.array([1, 2]), dense_unit_D=np.array([0]), replica_pool_XR=[[1], [0]]
    )
    assert c.snapshot_s == pytest.approx(768 / 4 / 5e8 + 2e-6)
    slow = dict(TINY, nodes=[dict(n, pools=[{"memory": 1e12, "bandwidth": 1e3}]) for n in TINY["nodes"]])
    c = step_cost(
        Topology.from_spec(slow),
        w,
        expert_unit_X=np.array([1, 2]),
        dense_unit_D=[0],
        replica_pool_XR=[[1], [1]],
    )
    assert c.snapshot_s == pytest.approx(2 * 768 / 4 / 1e3), "two replicas written into one slow pool"


def test_two_dense_units_split_the_tokens():
    w = tiny_workload(n_dense=2)
    assert w.edge_bytes_X.tolist() == [1200, 400]
    t = Topology.from_spec(TINY)
    c = step_cost(t, w, expert_unit_X=np.array([1, 2]), dense_unit_D=np.array([0, 1]))
    assert c.edges.bytes_Y.sum() == pytest.approx(3200), "the same total bytes, over twice the edges"
    assert c.dense_compute_s == pytest.approx(1e4 / 2 / 1e6)


def test_layers_add_up():
    t = Topology.from_spec(TINY)
    w = tiny_workload(n_layers=2, load=[[0.75, 0.25], [0.25, 0.75]], replicas=0)
    c = step_cost(t, w, expert_unit_X=np.array([1, 2, 1, 2]), dense_unit_D=np.array([0]))
    assert len(c.layer_time_s_L) == 2 and c.layer_time_s_L[0] != c.layer_time_s_L[1]
    assert c.step_time_s == pytest.approx(c.dense_compute_s + c.layer_time_s_L.sum())
    assert w.expert_id(3) == (1, 1)


def test_capacity_factor_caps_rows():
    w = tiny_workload(capacity_factor=1.0)  # capacity = ceil(1.0 * 100 * 1 / 2) = 50
    assert w.rows_X.tolist() == [50.0, 25.0]


def test_from_moe_config():
    cfg = zr.MoEConfig(n_experts=8, d_model=64, d_ff=128, n_layers=3, n_heads=4, top_k=2)
    w = Workload.from_moe_config(cfg, tokens_per_step=1024, replicas=0)
    assert (w.n_layers, w.n_experts, w.top_k, w.d_model, w.d_ff) == (3, 8, 2, 64, 128)
    assert w.params_per_expert == 2 * 64 * 128 and w.replicas == 0
    assert w.dense_flops_per_step > 0 and w.dense_memory_bytes > 0


def test_zipf_load():
    load = zipf_load(4, 1.0)
    assert load.sum() == pytest.approx(1.0)
    assert load.tolist() == pytest.approx(np.array([1, 1 / 2, 1 / 3, 1 / 4]) / (25 / 12))
    assert sorted(zipf_load(4, 1.0, seed=3).tolist()) == sorted(load.tolist())
    assert zipf_load(5, 0.0).tolist() == pytest.approx([0.2] * 5)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"n_experts": 0}, r"Workload.n_experts=0"),
        ({"top_k": 3}, r"top_k=3 must be <= n_experts \(2\)"),
        ({"load": [1.0, 2.0, 3.0]}, r"load has shape \(3,\)"),
        ({"load": [-1.0, 2.0]}, r"load must be finite, >= 0"),
        ({"replicas": -1}, r"replicas=-1"),
        ({"capacity_factor": 0}, r"capacity_factor=0"),
    ],
)
def test_workload_validation(overrides, match):
    with pytest.raises(ConfigError, match=match):
        tiny_workload(**overrides)


def test_step_cost_rejects_a_mismatched_placement():
    t = Topology.from_spec(TINY)
    with pytest.raises(ConfigError, match="placement shape mismatch"):
        step_cost(t, tiny_workload(), expert_unit_X=np.array([1]), dense_unit_D=np.array([0]))
