"""choose_replica_nodes: distinct nodes, never the unit's own while another exists, other racks first."""

from __future__ import annotations

import logging
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zetta_ray.checkpoint import ReplicaPlacementError, choose_replica_nodes
from zetta_ray.errors import ConfigError

pytestmark = pytest.mark.unit


@st.composite
def clusters(draw):
    nodes = draw(
        st.lists(st.sampled_from([f"n{i}" for i in range(12)]), min_size=1, max_size=12, unique=True)
    )
    unit_node = draw(st.sampled_from([*nodes, "elsewhere"]))
    n_racks = draw(st.integers(1, 4))
    racks = {n: f"r{draw(st.integers(0, n_racks - 1))}" for n in [*nodes, unit_node]}
    return unit_node, nodes, racks, draw(st.integers(1, 5)), draw(st.integers(0, 50))


@settings(max_examples=300, deadline=None)
@given(clusters())
def test_replicas_are_distinct_avoid_the_unit_node_and_prefer_other_racks(cluster):
    unit_node, nodes, racks, replicas, key = cluster
    chosen = choose_replica_nodes(unit_node, nodes, replicas, racks=racks, key=key)
    others = [n for n in nodes if n != unit_node]
    assert len(set(chosen)) == len(chosen)
    assert set(chosen) <= set(nodes)
    if others:
        assert unit_node not in chosen
        assert len(chosen) == min(replicas, len(others))
    else:
        assert chosen == (unit_node,)
    off_rack = [n for n in others if racks[n] != racks[unit_node]]
    assert sum(racks[n] != racks[unit_node] for n in chosen) == min(len(chosen), len(off_rack))
    # Deterministic, whatever order the nodes arrive in.
    shuffled = random.Random(key).sample(nodes + nodes[:2], len(nodes) + min(2, len(nodes)))
    assert choose_replica_nodes(unit_node, shuffled, replicas, racks=racks, key=key) == chosen


def test_replicas_span_racks_before_reusing_one():
    racks = {"a0": "A", "a1": "A", "b0": "B", "b1": "B", "c0": "C", "c1": "C"}
    chosen = choose_replica_nodes("a0", racks, 2, racks=racks)
    assert {racks[n] for n in chosen} == {"B", "C"}
    chosen3 = choose_replica_nodes("a0", racks, 3, racks=racks)
    assert [racks[n] for n in chosen3][:2] in (["B", "C"], ["C", "B"]) and racks[chosen3[2]] in "BC"


def test_key_spreads_units_over_nodes():
    nodes = [f"n{i}" for i in range(8)]
    firsts = {choose_replica_nodes("n0", nodes, 1, key=k)[0] for k in range(7)}
    assert firsts == set(nodes) - {"n0"}


def test_too_few_nodes_degrades_with_a_warning_or_raises_when_strict(caplog):
    with caplog.at_level(logging.WARNING, logger="zetta_ray.checkpoint"):
        assert choose_replica_nodes("a", ["a", "b"], 2) == ("b",)
        assert choose_replica_nodes("a", ["a"], 2) == ("a",)
    assert "replicas=2 needs 2 nodes" in caplog.text and "own node" in caplog.text
    with pytest.raises(ReplicaPlacementError, match=r"only 1 exist \(\['b'\]\).*lower TrickleCheckpoint"):
        choose_replica_nodes("a", ["a", "b"], 2, strict=True)
    with pytest.raises(ReplicaPlacementError, match="empty"):
        choose_replica_nodes("a", [], 1)


def test_bad_arguments_are_named():
    with pytest.raises(ConfigError, match="replicas=0"):
        choose_replica_nodes("a", ["b"], 0)
    with pytest.raises(ConfigError, match=r"no entry for node\(s\) \['b'\]"):
        choose_replica_nodes("a", ["b"], 1, racks={"a": "r0"})
