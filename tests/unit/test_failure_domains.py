"""The failure-domain rule (``zetta_ray/failure_domains.py``) that the placer and the live runtime share."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from zetta_ray.checkpoint import choose_replica_nodes
from zetta_ray.failure_domains import most_replicas, replica_allowed, spans_racks

pytestmark = pytest.mark.unit

RACK = {"a1": "A", "a2": "A", "a3": "A", "b1": "B", "c1": "C"}


def test_rule_on_scalars():
    home = {"unit_node": "a1", "unit_rack": "A"}
    assert not replica_allowed("a1", "A", **home, rack_rule=False)  # its own node: never
    assert replica_allowed("a2", "A", **home, rack_rule=False)
    assert not replica_allowed("a2", "A", **home, rack_rule=True)  # its rack, where pools span racks
    assert replica_allowed("b1", "B", **home, rack_rule=True)
    assert not replica_allowed("b1", "B", **home, taken=["b1"], rack_rule=True)  # one copy per node


def test_rule_on_arrays_matches_scalars():
    nodes = np.array([0, 1, 2, 3, 4])
    racks = np.array([0, 0, 0, 1, 2])
    for rack_rule, taken in itertools.product([False, True], [[], [3], [1, 4]]):
        mask = replica_allowed(nodes, racks, unit_node=1, unit_rack=0, taken=taken, rack_rule=rack_rule)
        scalar = [
            replica_allowed(int(n), int(r), unit_node=1, unit_rack=0, taken=taken, rack_rule=rack_rule)
            for n, r in zip(nodes, racks, strict=True)
        ]
        assert mask.tolist() == scalar


@pytest.mark.parametrize(
    "racks",
    [[], ["A"], ["A", "A", "A"], ["A", "A", "A", "B", "C"], ["A", "B"], ["A", "A", "B", "B", "B"]],
)
def test_most_replicas_is_the_rule_counted_for_the_worst_placed_unit(racks):
    """The closed form equals the brute force: for a unit on each pool node in turn, how many pool
    nodes the rule allows; the fewest."""
    rule = spans_racks(racks)
    allowed = [
        sum(
            bool(replica_allowed(j, racks[j], unit_node=i, unit_rack=racks[i], rack_rule=rule))
            for j in range(len(racks))
        )
        for i in range(len(racks))
    ]
    assert most_replicas(racks) == min(allowed, default=0)


def test_live_choice_prefers_what_the_rule_allows_and_degrades_in_the_units_rack():
    nodes = list(RACK)
    # two replicas: the two other racks first
    assert set(choose_replica_nodes("a1", nodes, 2, racks=RACK)) == {"b1", "c1"}
    # three: the rule allows only two nodes, so the third is in the unit's rack (never its node)
    chosen = choose_replica_nodes("a1", nodes, 3, racks=RACK)
    assert set(chosen[:2]) == {"b1", "c1"} and chosen[2] in ("a2", "a3")
