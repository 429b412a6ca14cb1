"""The placer: its rules always hold (property tests), it is deterministic, it beats the baselines where
topology or load is uneven, and impossible requests fail with a message that names what is missing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import two_node_spec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zetta_ray.errors import ConfigError, ZettaError
from zetta_ray.placement import (
    InfeasiblePlacementError,
    PlacementError,
    PlacerConfig,
    Topology,
    Workload,
    check_placement,
    place,
    random_placement,
    round_robin,
    zipf_load,
)

pytestmark = pytest.mark.unit

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "topologies"
GiB = 2**30
PLACERS = (place, round_robin, random_placement)
PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def machines(draw: st.DrawFn) -> Topology:
    """Small machines of 1-2 pods, 1-3 racks a pod, 1-3 nodes a rack, mixed kinds, speeds and pools."""
    pods = []
    for _ in range(draw(st.integers(1, 2))):
        racks = []
        for _ in range(draw(st.integers(1, 3))):
            nodes = []
            for _ in range(draw(st.integers(1, 3))):
                kinds = draw(
                    st.lists(st.sampled_from(["npu", "gpu", "cpu"]), min_size=1, max_size=2, unique=True)
                )
                units = [
                    {
                        "kind": kind,
                        "count": draw(st.integers(0, 3)),
                        "flops": draw(st.sampled_from([50e12, 150e12, 400e12, 1000e12])),
                        "memory": draw(st.sampled_from([1 * GiB, 4 * GiB, 16 * GiB])),
                    }
                    for kind in kinds
                ]
                pools = draw(
                    st.sampled_from([[], [{"memory": GiB // 8, "bandwidth": 10e9}], [{"memory": 64 * GiB}]])
                )
                nodes.append({"units": units, "pools": pools})
            racks.append({"nodes": nodes})
        pods.append({"racks": racks})
    links = {
        "rack": {"bandwidth": draw(st.sampled_from([5e9, 25e9])), "latency": 5e-6},
        "fabric": {"bandwidth": draw(st.sampled_from([1e9, 6e9])), "latency": 30e-6},
    }
    return Topology.from_spec({"pods": pods, "links": links})


@st.composite
def workloads(draw: st.DrawFn) -> Workload:
    n_experts = draw(st.integers(1, 16))
    load = draw(st.lists(st.floats(0.0, 10.0), min_size=n_experts, max_size=n_experts))
    return Workload(
        n_experts=n_experts,
        n_layers=draw(st.integers(1, 2)),
        top_k=1,
        d_model=512,
        d_ff=2048,
        tokens_per_step=draw(st.sampled_from([1024, 65536])),
        load=np.asarray(load) + 1e-3,
        n_dense=draw(st.integers(1, 2)),
        dense_flops_per_step=draw(st.sampled_from([0.0, 1e12, 1e14])),
        dense_memory_bytes=draw(st.sampled_from([0, GiB // 2])),
        replicas=draw(st.integers(0, 2)),
        expert_memory_bytes=draw(st.sampled_from([GiB // 4, GiB, 3 * GiB])),
    )


def assert_rules(t: Topology, w: Workload, p) -> None:
    """The rules, checked here independently of ``check_placement`` (which is also called)."""
    check_placement(t, w, p)
    used = np.bincount(p.expert_unit_X, weights=w.memory_X, minlength=t.n_units)
    used += np.bincount(p.dense_unit_D, minlength=t.n_units) * w.dense_memory_bytes
    assert np.all(used <= t.unit_memory_U), "a unit holds more than its memory"
    assert len(set(p.dense_unit_D.tolist())) == w.n_dense
    assert {t.kinds[k] for k in t.unit_kind_U[p.expert_unit_X]} <= {"npu", "gpu", "cpu"}
    if w.replicas:
        assert p.replica_pool_XR.shape == (w.total_experts, w.replicas) and p.replica_pool_XR.min() >= 0
        pool_used = np.bincount(p.replica_pool_XR.ravel(), minlength=t.n_pools) * w.snapshot_bytes
        assert np.all(pool_used <= t.pool_memory_P), "a pool holds more than its memory"
        racks_count = len(set(t.pool_rack_P.tolist())) > 1
        for x, unit in enumerate(p.expert_unit_X):
            nodes = t.pool_node_P[p.replica_pool_XR[x]]
            assert t.unit_node_U[unit] not in nodes, "a replica shares its expert's node"
            assert len(set(nodes.tolist())) == w.replicas, "two replicas of one expert share a node"
            if racks_count:
                assert t.unit_rack_U[unit] not in t.node_rack_N[nodes], "a replica shares its expert's rack"


@PROPERTY
@given(t=machines(), w=workloads(), seed=st.integers(0, 3))
def test_every_placer_obeys_the_rules_or_says_why_not(t, w, seed):
    plans = {}
    for placer in PLACERS:
        try:
            plans[placer.__name__] = placer(t, w, PlacerConfig(seed=seed))
        except InfeasiblePlacementError as e:
            assert "Add" in str(e) or "lower" in str(e) or "Lower" in str(e), f"no fix named: {e}"
            continue
        assert_rules(t, w, plans[placer.__name__])
    if "place" in plans and "round_robin" in plans:
        assert plans["place"].step_time_s <= plans["round_robin"].step_time_s * (1 + 1e-9)
    # The placer falls back to the round-robin layout, so it places whatever round-robin places.
    assert "round_robin" not in plans or "place" in plans


@PROPERTY
@given(t=machines(), w=workloads(), seed=st.integers(0, 3))
def test_kinds_are_respected_when_the_preferred_kind_has_room(t, w, seed):
    npu = t.units_of_kind("npu")
    gpu = t.units_of_kind("gpu")
    w.replicas = 0  # isolate the kind rule from the failure-domain rule
    per_unit = -(-w.total_experts // max(len(npu), 1)) * float(w.memory_X.max()) + w.dense_memory_bytes
    roomy = len(npu) and float(t.unit_memory_U[npu].min()) >= per_unit
    try:
        p = place(t, w, PlacerConfig(seed=seed))
    except InfeasiblePlacementError:
        assert not roomy
        return
    if roomy:
        assert set(p.expert_unit_X.tolist()) <= set(npu.tolist()), "experts left the npu units with room"
    dense_ok = gpu[t.unit_memory_U[gpu] >= w.dense_memory_bytes]
    if len(dense_ok) >= w.n_dense:
        assert set(p.dense_unit_D.tolist()) <= set(gpu.tolist()), "dense units left the gpu units"


@PROPERTY
@given(t=machines(), w=workloads(), seed=st.integers(0, 1000))
def test_deterministic_for_a_seed(t, w, seed):
    try:
        a = place(t, w, PlacerConfig(seed=seed))
    except InfeasiblePlacementError:
        return
    b = place(t, w, PlacerConfig(seed=seed))
    assert np.array_equal(a.expert_unit_X, b.expert_unit_X)
    assert np.array_equal(a.dense_unit_D, b.dense_unit_D)
    assert np.array_equal(a.replica_pool_XR, b.replica_pool_XR)
    assert a.step_time_s == b.step_time_s


def skewed_moe(n_experts: int = 64, **overrides) -> Workload:
    values = dict(
        n_experts=n_experts,
        n_layers=2,
        d_model=4096,
        d_ff=14336,
        tokens_per_step=1 << 20,
        load=zipf_load(n_experts, 1.0, seed=0),
        n_dense=8,
        dense_flops_per_step=1e15,
    )
    values.update(overrides)
    return Workload(**values)


UNIFORM_RACKS = {  # one gpu node, then two racks of identical npu nodes: only the load is uneven
    "racks": [
        {
            "nodes": [
                {"units": [{"kind": "gpu", "count": 8, "flops": "1000T", "memory": "80GiB"}]},
                {"count": 3, "units": [{"kind": "npu", "count": 8, "flops": "400T", "memory": "64GiB"}]},
            ]
        },
        {"nodes": [{"count": 4, "units": [{"kind": "npu", "count": 8, "flops": "400T", "memory": "64GiB"}]}]},
    ],
    "nodes": [],
}
for _rack in UNIFORM_RACKS["racks"]:
    for _node in _rack["nodes"]:
        _node["pools"] = [{"memory": "2TiB", "bandwidth": "100GB/s"}]
UNIFORM_RACKS.pop("nodes")


@pytest.mark.parametrize(
    ("machine", "n_experts", "load"),
    [
        ("three_tier_skewed", 256, "zipf"),  # uneven topology and load
        ("three_tier_skewed", 256, "uniform"),  # uneven topology only
        ("uniform_racks", 64, "zipf"),  # uneven load only
    ],
)
def test_beats_round_robin_and_random_where_things_are_uneven(machine, n_experts, load):
    if machine == "uniform_racks":
        t = Topology.from_spec(UNIFORM_RACKS)
    else:
        t = Topology.from_file(EXAMPLES / f"{machine}.toml")
    w = skewed_moe(n_experts, load=None) if load == "uniform" else skewed_moe(n_experts)
    placed = place(t, w)
    assert_rules(t, w, placed)
    rr = round_robin(t, w)
    assert placed.step_time_s < 0.9 * rr.step_time_s, (placed.cost.to_dict(), rr.cost.to_dict())
    for seed in range(3):
        assert placed.step_time_s < random_placement(t, w, PlacerConfig(seed=seed)).step_time_s


def test_a_hand_checked_plan():
    # node 0: unit 0 gpu, unit 1 fast npu; node 1: unit 2 slow npu. One hot and one cold expert.
    t = Topology.from_spec(two_node_spec())
    w = Workload(
        n_experts=2,
        top_k=1,
        d_model=4,
        d_ff=8,
        tokens_per_step=100,
        load=[0.75, 0.25],
        dense_flops_per_step=1e4,
    )
    p = place(t, w)
    assert p.dense_unit_D.tolist() == [0], "the only gpu"
    assert p.expert_unit_X.tolist() == [1, 2], "the hot expert on the fast npu next to the router"
    assert p.replica_pool_XR.tolist() == [[1], [0]], "each replica on the other node"
    assert p.unit_of(0, 1) == 2 and p.experts_on(1) == [(0, 0)]


def test_usable_mask_keeps_units_out():
    t = Topology.from_file(EXAMPLES / "three_tier_skewed.toml")
    w = skewed_moe(16)
    usable = np.ones(t.n_units, dtype=bool)
    banned = place(t, w).expert_unit_X
    usable[banned] = False
    p = place(t, w, usable_U=usable)
    assert not set(p.expert_unit_X.tolist()) & set(banned.tolist())
    assert_rules(t, w, p)
    with pytest.raises(PlacementError, match="usable_U must be a bool mask"):
        place(t, w, usable_U=np.ones(3, dtype=bool))


def test_plan_table_is_json_ready():
    t = Topology.from_file(EXAMPLES / "three_tier_skewed.toml")
    w = skewed_moe(8, n_dense=2)
    p = place(t, w)
    data = json.loads(json.dumps(p.to_dict(t, w)))
    assert data["method"] == "placer" and data["cost"]["step_time_s"] == pytest.approx(p.step_time_s)
    row = data["experts"][0]
    assert {"layer", "expert", "unit", "kind", "node", "load", "compute_s", "token_bytes", "links"} <= set(
        row
    )
    assert len(row["links"]) == w.n_dense + w.replicas
    assert sum(link["bytes"] for link in row["links"] if link["kind"] == "tokens") == pytest.approx(
        row["token_bytes"]
    )


# -- impossible requests -----------------------------------------------------------------------------------

NPU_NODE = {
    "units": [{"kind": "npu", "count": 2, "flops": "400T", "memory": "4GiB"}],
    "pools": [{"memory": "1TiB"}],
}


def small(**overrides) -> Workload:
    values = dict(n_experts=4, d_model=64, d_ff=128, tokens_per_step=256, expert_memory_bytes=GiB)
    values.update(overrides)
    return Workload(**values)


@pytest.mark.parametrize(
    ("spec", "workload", "config", "match"),
    [
        ({"nodes": [NPU_NODE, NPU_NODE]}, small(n_experts=40), None, r"the experts need 40 GiB in all"),
        (
            {"nodes": [NPU_NODE, NPU_NODE]},
            small(),
            PlacerConfig(expert_kinds=("tpu",)),
            r"no unit of kind tpu",
        ),
        ({"nodes": [NPU_NODE, NPU_NODE]}, small(n_dense=5), None, r"needs 5 dense unit\(s\).*only 4 exist"),
        ({"nodes": [NPU_NODE]}, small(), None, r"single-node machine needs replicas=0"),
        ({"nodes": [NPU_NODE, NPU_NODE]}, small(replicas=2), None, r"2 snapshot replica\(s\) per expert"),
        (  # two racks with pools: a replica must leave its expert's rack, and rack 1 has one pool node
            {"racks": [{"nodes": [NPU_NODE, NPU_NODE]}, {"nodes": [{"pools": [{"memory": "1TiB"}]}]}]},
            small(replicas=2),
            None,
            r"pool nodes off its node and rack",
        ),
    ],
)
def test_infeasible_requests_name_what_is_missing(spec, workload, config, match):
    t = Topology.from_spec(spec)
    for placer in PLACERS:
        with pytest.raises(InfeasiblePlacementError, match=match) as info:
            placer(t, workload, config)
        assert isinstance(info.value, ZettaError) and isinstance(info.value, ValueError)


def test_check_placement_names_broken_rules():
    t = Topology.from_spec({"nodes": [NPU_NODE, NPU_NODE]})
    w = small()
    p = place(t, w)
    p.replica_pool_XR[:] = t.unit_node_U[p.expert_unit_X][:, None]  # every replica onto its expert's node
    p.expert_unit_X[:] = 0  # all four 1 GiB experts on one 4 GiB unit, beside the dense unit's share
    with pytest.raises(PlacementError, match="breaks the placement rules: .*replica on its own node"):
        check_placement(t, w, p)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"seed": -1}, r"PlacerConfig.seed=-1"),
        ({"expert_kinds": "npu"}, r"expert_kinds='npu' must be a non-empty tuple"),
        ({"dense_kinds": ()}, r"dense_kinds=\(\) must be a non-empty tuple"),
        ({"rounds": 0}, r"rounds=0 must be >= 1"),
    ],
)
def test_placer_config_validation(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        PlacerConfig(**kwargs)
