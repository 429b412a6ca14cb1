"""The failure-domain rule for snapshot replicas, in one place.

A replica protects its unit only against the failures it does not share with it. So a replica may sit

1. never on the unit's node: it would die with the node;
2. not in the unit's rack, where the candidate pools span more than one rack (``spans_racks``): a rack
   fails as one (power, top-of-rack switch);
3. not on a node that already holds a replica of the same unit: two copies there are one failure.

``replica_allowed`` is the rule; ``most_replicas`` counts the replicas every unit can have under it. Two
callers apply it: the placer (``placement/replicas.py``) plans against it strictly and fails a plan that
cannot meet it; the live runtime (``checkpoint/replicas.py``, through ``control/replicas.py``) degrades
instead, as a running job must: it prefers the allowed nodes, takes a node in the unit's rack when no
other exists, and the unit's own node only on a single-node cluster (a copy there still survives the
unit's process dying, the common failure).

``replica_allowed`` takes scalars or numpy arrays for the candidates (``node``, ``rack``), so the placer
filters every pool of a machine at once. Pure; no Ray.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["most_replicas", "replica_allowed", "spans_racks"]


def spans_racks(racks: Iterable[Any]) -> bool:
    """Whether the candidates' racks are more than one (only then does rule 2 apply)."""
    return len(set(racks)) > 1


def replica_allowed(
    node: Any,
    rack: Any,
    *,
    unit_node: Any,
    unit_rack: Any,
    taken: Iterable[Any] = (),
    rack_rule: bool,
) -> Any:
    """Whether a replica of the unit on ``unit_node`` (in ``unit_rack``) may sit on ``node`` (in
    ``rack``), the unit's other replicas being on the ``taken`` nodes; ``rack_rule``: the candidates span
    racks (``spans_racks``). A bool for scalars, an elementwise boolean array for arrays."""
    ok = node != unit_node
    if rack_rule:
        ok = ok & (rack != unit_rack)
    for other in taken:
        ok = ok & (node != other)
    return ok


def most_replicas(pool_node_racks: Sequence[Any]) -> int:
    """How many replicas every unit can have under the rule, whatever its node and rack, given the rack
    of each node that holds a pool (one entry per node): the pool nodes outside the rack with the most
    of them where they span racks, else every pool node but the unit's own."""
    counts: dict[Any, int] = {}
    for rack in pool_node_racks:
        counts[rack] = counts.get(rack, 0) + 1
    if not counts:
        return 0
    if len(counts) > 1:
        return len(pool_node_racks) - max(counts.values())
    return len(pool_node_racks) - 1
