"""Where a unit's snapshot replicas go on the live cluster: R distinct nodes, away from the unit, spread
over racks.

The failure-domain rule (``zetta_ray/failure_domains.py``) says where a replica may sit; a running job
degrades rather than stops, so here it orders the candidates instead of excluding them. On the unit's
own node a replica survives only the unit's process dying, not the node; in the unit's rack it survives
a node failure but not a rack failure. So ``choose_replica_nodes`` ranks candidate nodes by

1. not the unit's node (never chosen while any other node exists),
2. allowed by the whole rule (not the unit's rack),
3. a rack no earlier replica of this unit uses (so R replicas span up to R racks),
4. a rotation of the sorted node list by ``key`` (pass the unit's index), so that the units of one node
   do not all send their replicas to the same few nodes.

The answer depends only on the arguments (node order in the input does not matter), so the controller
and a restarted controller compute the same placement. Capacity is not considered here: pass only nodes
whose MemoryPool has room.

With too few nodes, ``strict=True`` raises ``ReplicaPlacementError``; the default degrades to as many
distinct nodes as exist and logs a warning. A single-node cluster puts its one replica on the unit's own
node: that still survives the unit's process dying, which is the common failure.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping

from zetta_ray.errors import ConfigError, ReplicaPlacementError
from zetta_ray.failure_domains import replica_allowed

__all__ = ["choose_replica_nodes"]

logger = logging.getLogger(__name__)


def choose_replica_nodes(
    unit_node: str,
    nodes: Iterable[str],
    replicas: int,
    *,
    racks: Mapping[str, str] | None = None,
    key: int = 0,
    strict: bool = False,
    quiet: bool = False,
) -> tuple[str, ...]:
    """Nodes for the ``replicas`` copies of the snapshot of a unit that runs on ``unit_node``.

    Args:
        unit_node: the node id the unit runs on (need not be in ``nodes``).
        nodes: node ids that can hold a replica (duplicates are ignored).
        replicas: R, the number of copies wanted (>= 1).
        racks: node id -> rack id for every node in ``nodes`` and ``unit_node``; ``None`` treats each
            node as its own rack.
        key: rotates the choice among equally good nodes (use the unit's index) to spread load.
        strict: raise instead of degrading when fewer than ``replicas`` other nodes exist.
        quiet: degrade without the warning (a caller asking for many units warns once itself).

    Returns:
        Distinct node ids, best first: ``replicas`` of them, or fewer when degraded.
    """
    if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 1:
        raise ConfigError(f"replicas={replicas!r} is invalid: must be an integer >= 1")
    pool = sorted(set(nodes))
    if not pool:
        raise ReplicaPlacementError(
            f"no node can hold a replica of the snapshot of the unit on {unit_node!r}: the node list is "
            "empty. Start MemoryPool actors (or add nodes) before placing snapshot replicas."
        )
    rack = _rack_lookup(racks, [*pool, unit_node])
    home = {"unit_node": unit_node, "unit_rack": rack(unit_node)}
    others = [n for n in pool if replica_allowed(n, rack(n), **home, rack_rule=False)]
    if len(others) < replicas:
        msg = (
            f"replicas={replicas} needs {replicas} nodes other than the unit's node {unit_node!r}, but "
            f"only {len(others)} exist ({others}); add nodes or lower TrickleCheckpoint(replicas=...)"
        )
        if strict:
            raise ReplicaPlacementError(msg)
        if not others:
            if not quiet:
                logger.warning("%s; keeping the single replica on the unit's own node", msg)
            return (unit_node,)
        if not quiet:
            logger.warning("%s; placing %d replica(s) instead", msg, len(others))
    shift = key % len(others)
    order = {n: (i - shift) % len(others) for i, n in enumerate(others)}
    chosen: list[str] = []
    used_racks: set[str] = set()
    remaining = list(others)
    for _ in range(min(replicas, len(others))):
        best = min(  # allowed by the whole rule first, then a rack no replica uses yet
            remaining,
            key=lambda n: (
                not replica_allowed(n, rack(n), **home, rack_rule=True),
                rack(n) in used_racks,
                order[n],
            ),
        )
        chosen.append(best)
        used_racks.add(rack(best))
        remaining.remove(best)
    return tuple(chosen)


def _rack_lookup(racks: Mapping[str, str] | None, needed: list[str]) -> Callable[[str], str]:
    if racks is None:
        return lambda n: n
    missing = sorted({n for n in needed if n not in racks})
    if missing:
        raise ConfigError(
            f"racks has no entry for node(s) {missing[:5]}; give every node a rack, or pass racks=None"
        )
    return racks.__getitem__
