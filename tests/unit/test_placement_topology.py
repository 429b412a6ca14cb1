"""Topology: the spec and ray.nodes() constructors, tiers between units and pools, spec errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from zetta_ray.errors import ConfigError
from zetta_ray.placement import LinkTiers, Tier, Topology
from zetta_ray.placement.spec import parse_quantity

pytestmark = pytest.mark.unit

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "topologies"

TWO_PODS = {
    "name": "two-pods",
    "links": {"rack": {"bandwidth": "20GB/s", "latency": "4us"}},
    "node_types": {
        "npu4": {
            "units": [{"kind": "npu", "count": 4, "flops": "400T", "memory": "64GiB"}],
            "pools": [{"memory": "1TiB", "bandwidth": "100GB/s"}],
        }
    },
    "pods": [
        {
            "count": 2,
            "racks": [
                {"count": 2, "nodes": [{"type": "npu4", "count": 3}]},
                {
                    "name": "head",
                    "nodes": [{"units": [{"kind": "gpu", "count": 2, "flops": 1e15, "memory": 8e10}]}],
                },
            ],
        }
    ],
}


def test_spec_expands_counts_into_units_nodes_racks_and_pods():
    t = Topology.from_spec(TWO_PODS)
    # Per pod: 2 racks x 3 nodes x 4 npu + 1 rack x 1 node x 2 gpu.
    assert (t.n_pods, t.n_racks, t.n_nodes, t.n_units, t.n_pools) == (2, 6, 14, 52, 12)
    assert t.kinds == ("gpu", "npu")
    assert t.summary()["kinds"]["npu"]["units"] == 48
    assert t.summary()["kinds"]["gpu"]["flops"] == 4 * 1e15
    assert np.all(np.diff(t.unit_node_U) >= 0), "units are ordered by node"
    assert t.unit_memory_U[t.units_of_kind("npu")].tolist() == [64 * 2**30] * 48
    assert t.rack_names[2] == "pod0.head" and t.pod_names == ("pod0", "pod1")
    assert t.links.rack.bandwidth == 20e9 and t.links.rack.latency == pytest.approx(4e-6)
    assert t.links.node == LinkTiers().node, "tiers the spec leaves out keep their defaults"
    # The unit's slot is its index among its node's units of its kind.
    first_node = np.flatnonzero(t.unit_node_U == 0)
    assert t.unit_slot_U[first_node].tolist() == [0, 1, 2, 3]
    info = t.unit_info(int(first_node[2]))
    assert info["kind"] == "npu" and info["slot"] == 2 and info["pod"] == "pod0"


def test_tiers_follow_the_lowest_common_failure_domain():
    t = Topology.from_spec(TWO_PODS)
    npu = t.units_of_kind("npu")
    same_node = npu[:2]
    a, b = int(npu[0]), int(npu[4])  # node 0 and node 1 of rack 0
    c = int(npu[12])  # rack 1, pod 0
    d = int(np.flatnonzero(t.unit_pod_U == 1)[0])
    assert t.unit_tier(a, a) == Tier.UNIT
    assert t.unit_tier(*same_node) == Tier.NODE
    assert t.unit_tier(a, b) == Tier.RACK
    assert t.unit_tier(a, c) == Tier.POD
    assert t.unit_tier(a, d) == Tier.FABRIC
    # Broadcasting: one unit against all, no N^2 matrix needed anywhere.
    row = t.unit_tier(a, np.arange(t.n_units))
    assert row.shape == (t.n_units,) and row[a] == Tier.UNIT and set(row.tolist()) == set(range(5))
    assert t.pool_tier(a, 0) == Tier.NODE and t.pool_tier(a, 1) == Tier.RACK
    assert t.links.bandwidth_T[Tier.UNIT] == np.inf and t.links.latency_T[Tier.UNIT] == 0


def test_arrays_are_read_only():
    t = Topology.from_spec(TWO_PODS)
    with pytest.raises(ValueError):
        t.unit_flops_U[0] = 1.0


def test_spec_without_pods_or_racks_is_one_pod_one_rack():
    t = Topology.from_spec(
        {"nodes": [{"count": 2, "units": [{"kind": "cpu", "count": 2, "flops": 1e11, "memory": "8GiB"}]}]}
    )
    assert (t.n_pods, t.n_racks, t.n_nodes, t.n_units, t.n_pools) == (1, 1, 2, 4, 0)


@pytest.mark.parametrize(
    ("text", "unit", "value"),
    [
        ("64GiB", "B", 64 * 2**30),
        ("1.5 TB", "B", 1.5e12),
        ("400T", "FLOP/s", 400e12),
        ("400TFLOP/s", "FLOP/s", 400e12),
        ("2PFLOPS", "FLOP/s", 2e15),
        ("25GB/s", "B/s", 25e9),
        ("5us", "s", 5e-6),
        ("1ms", "s", 1e-3),
        (3, "B", 3.0),
    ],
)
def test_quantities(text, unit, value):
    assert parse_quantity(text, unit=unit, where="x") == pytest.approx(value)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"nodez": []}, r"unknown key\(s\) \['nodez'\]"),
        (
            {"nodes": [{"units": [{"kind": "npu", "flops": "fast", "memory": 1}]}]},
            r"nodes\[0\]\.units\[0\]\.flops",
        ),
        (
            {"nodes": [{"units": [{"kind": "npu", "flops": "25GB/s", "memory": 1}]}]},
            "is in B/s but must be in FLOP/s",
        ),
        ({"nodes": [{"units": [{"kind": "npu", "flops": 0, "memory": 1}]}]}, r"flops \(0\) must be > 0"),
        ({"nodes": [{"type": "big"}]}, r"type='big' is not defined"),
        ({"nodes": [{"count": -1}]}, r"count=-1 is invalid"),
        ({"links": {"spine": {}}}, r"unknown tier\(s\) \['spine'\]"),
        (
            {"nodes": [{"units": [{"kind": "npu", "flops": 1, "memory": 1, "hbm": 2}]}]},
            r"unknown key\(s\) \['hbm'\]",
        ),
    ],
)
def test_spec_errors_name_the_field(spec, match):
    with pytest.raises(ConfigError, match=match):
        Topology.from_spec(spec)


def test_from_file_toml_and_json_agree(tmp_path):
    toml_t = Topology.from_file(EXAMPLES / "three_tier_skewed.toml")
    assert toml_t.name == "three-tier-skewed"
    assert (toml_t.n_pods, toml_t.n_racks, toml_t.n_units) == (3, 12, 736)
    path = tmp_path / "m.json"
    path.write_text(json.dumps(TWO_PODS))
    json_t = Topology.from_file(path)
    assert json_t.summary() == Topology.from_spec(TWO_PODS).summary()
    bad = tmp_path / "m.yaml"
    bad.write_text("")
    with pytest.raises(ConfigError, match="must end in .toml or .json"):
        Topology.from_file(bad)
    broken = tmp_path / "broken.toml"
    broken.write_text("[[nodes]\n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        Topology.from_file(broken)


def test_laptop_example_is_one_node():
    t = Topology.from_file(EXAMPLES / "laptop.toml")
    assert (t.n_nodes, t.n_pools) == (1, 1)
    assert t.summary()["kinds"]["npu"]["units"] == 8 and t.summary()["kinds"]["gpu"]["units"] == 2


def _ray_node(node_id, *, alive=True, labels=None, **resources):
    return {"NodeID": node_id, "Alive": alive, "Resources": resources, "Labels": labels or {}}


def test_from_ray_nodes_reads_kinds_memory_racks_and_zones():
    nodes = [
        _ray_node(
            "aa",
            CPU=2.0,
            npu=4.0,
            gpu=1.0,
            memory=14e9,
            object_store_memory=6e9,
            labels={"rack": "r1", "ray.io/availability-zone": "z1"},
        ),
        _ray_node(
            "bb",
            CPU=4.0,
            GPU=2.0,
            memory=8e9,
            object_store_memory=2e9,
            labels={"rack": "r2"},
            **{"zone:z1": 1},
        ),
        _ray_node("cc", alive=False, CPU=64.0, npu=8.0, memory=1e12),
        _ray_node("dd", CPU=1.5, memory=3e9, object_store_memory=1e9, **{"rack:r1": 1.0}),
    ]
    t = Topology.from_ray_nodes(nodes)
    assert t.node_names == ("aa", "bb", "dd"), "dead nodes are left out"
    counts = {k: len(t.units_of_kind(k)) for k in t.kinds}
    assert counts == {"npu": 4, "gpu": 1 + 2, "cpu": 2 + 4 + 1}
    # Without unit_memory, each node's memory is split evenly over its units (7 units on node aa).
    assert set(t.unit_memory_U[t.unit_node_U == 0].tolist()) == {2_000_000_000}
    assert t.pool_memory_P.tolist() == [6_000_000_000, 2_000_000_000, 1_000_000_000]
    # aa: (z1, r1); bb: (z1, r2) via the zone:z1 resource; dd: (default, r1): another pod.
    assert t.n_pods == 2 and t.n_racks == 3
    assert t.node_tier(0, 1) == Tier.POD and t.node_tier(0, 2) == Tier.FABRIC
    assert t.rack_names == ("z1/r1", "z1/r2", "default/r1")
    assert t.unit_flops_U[t.units_of_kind("npu")][0] == 400e12


def test_from_ray_nodes_options_and_defaults():
    nodes = [_ray_node("n0", CPU=2.0, npu=2.0, memory=4e9), _ray_node("n1", CPU=2.0, npu=2.0, memory=4e9)]
    t = Topology.from_ray_nodes(
        nodes, flops={"npu": 1e12}, unit_memory={"npu": 1e9}, links=LinkTiers(), kinds={"npu": ("npu",)}
    )
    assert t.kinds == ("npu",) and t.n_units == 4
    assert t.unit_memory_U.tolist() == [1_000_000_000] * 4 and t.unit_flops_U.tolist() == [1e12] * 4
    assert t.n_racks == 1, "no rack labels: one rack, so the placer's rack rule does not apply"
    with pytest.raises(ConfigError, match="no peak FLOP/s for unit kind"):
        Topology.from_ray_nodes(nodes, kinds={"tpu": ("tpu",)})
    assert Topology.from_ray_nodes([]).n_units == 0
