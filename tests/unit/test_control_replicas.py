"""decide_replica_nodes: live, non-full pools on distinct nodes away from the unit."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zetta_ray.checkpoint import ReplicaPlacementError
from zetta_ray.control import decide_replica_nodes

pytestmark = pytest.mark.unit

POOLS = {"p0": "n0", "p1": "n1", "p1b": "n1", "p2": "n2", "p3": "n3"}


def test_skips_the_unit_node_dead_nodes_and_full_pools():
    assert decide_replica_nodes("n0", POOLS, 2) == (("p1", "n1"), ("p2", "n2"))
    assert decide_replica_nodes("n0", POOLS, 2, live_nodes={"n0", "n2", "n3"}) == (("p2", "n2"), ("p3", "n3"))
    assert decide_replica_nodes("n0", POOLS, 1, full_pools={"p1", "p2"}, live_nodes={"n0", "n1", "n2"}) == (
        ("p1b", "n1"),
    )


def test_key_rotates_among_nodes_and_among_pools_of_a_node():
    picks = {decide_replica_nodes("n0", POOLS, 1, key=k)[0] for k in range(6)}
    assert {n for _, n in picks} == {"n1", "n2", "n3"}
    assert {p for p, n in picks if n == "n1"} == {"p1", "p1b"}


def test_no_usable_pool_is_an_error_naming_the_fix():
    with pytest.raises(ReplicaPlacementError, match="Start MemoryPool actors"):
        decide_replica_nodes("n0", POOLS, 2, live_nodes={"n9"})
    with pytest.raises(ReplicaPlacementError, match="only 1 exist"):
        decide_replica_nodes("n0", {"p0": "n0", "p1": "n1"}, 2, strict=True)


@settings(max_examples=200, deadline=None)
@given(
    pools=st.dictionaries(st.integers(0, 20), st.sampled_from([f"n{i}" for i in range(6)]), min_size=1),
    unit_node=st.sampled_from([f"n{i}" for i in range(6)]),
    live=st.sets(st.sampled_from([f"n{i}" for i in range(6)]), min_size=1),
    replicas=st.integers(1, 4),
    key=st.integers(0, 30),
)
def test_chosen_pools_are_live_on_distinct_nodes_and_avoid_the_unit(pools, unit_node, live, replicas, key):
    usable_nodes = {n for n in pools.values() if n in live}
    if not usable_nodes:
        with pytest.raises(ReplicaPlacementError):
            decide_replica_nodes(unit_node, pools, replicas, live_nodes=live, key=key)
        return
    chosen = decide_replica_nodes(unit_node, pools, replicas, live_nodes=live, key=key)
    nodes = [n for _, n in chosen]
    assert len(set(nodes)) == len(nodes)
    assert all(pools[p] == n and n in live for p, n in chosen)
    others = usable_nodes - {unit_node}
    if others:
        assert unit_node not in nodes and len(chosen) == min(replicas, len(others))
    else:
        assert nodes == [unit_node]
