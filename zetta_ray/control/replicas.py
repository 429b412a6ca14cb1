"""Which MemoryPools hold a unit's next snapshot, on the live cluster.

``checkpoint.choose_replica_nodes`` picks R nodes for a unit's replicas (never the unit's own node while
another exists, other racks first, rotated by the unit's index). The live cluster adds two facts it
does not know: which nodes are alive, and which pools (there may be several per node, or none) have
room. ``decide_replica_nodes`` keeps the pools that are on live nodes and not full, lets
``choose_replica_nodes`` pick among their nodes, and names one pool on each chosen node.

Call it for every snapshot (the answer is cheap and deterministic), so that after a node or pool is
lost the next snapshot goes to R pools that exist.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from zetta_ray.checkpoint import choose_replica_nodes
from zetta_ray.control.faults import PoolId

__all__ = ["decide_replica_nodes"]


def decide_replica_nodes(
    unit_node: str,
    pools: Mapping[PoolId, str],
    replicas: int,
    *,
    live_nodes: Collection[str] | None = None,
    full_pools: Collection[PoolId] = (),
    racks: Mapping[str, str] | None = None,
    key: int = 0,
    strict: bool = False,
    quiet: bool = False,
) -> tuple[tuple[PoolId, str], ...]:
    """The ``(pool, node)`` pairs that should hold the next snapshot of the unit on ``unit_node``.

    Args:
        unit_node: the node the unit runs on.
        pools: every MemoryPool the controller runs: pool id -> its node id.
        replicas: R, how many copies (``TrickleCheckpoint.replicas``).
        live_nodes: nodes alive now; None: every pool's node.
        full_pools: pools that refused a put (``PoolFullError``) and should be skipped.
        racks, key, strict, quiet: as for ``checkpoint.choose_replica_nodes`` (pass the unit index as
            key).

    Returns:
        Up to R pairs on distinct nodes, best first (fewer, with a warning, when fewer nodes have a
        usable pool; ``ReplicaPlacementError`` when none has, or with ``strict=True``).
    """
    full = set(full_pools)
    usable = {p: n for p, n in pools.items() if p not in full and (live_nodes is None or n in live_nodes)}
    by_node: dict[str, list[PoolId]] = {}
    for p, n in usable.items():
        by_node.setdefault(n, []).append(p)
    nodes = choose_replica_nodes(
        unit_node, by_node, replicas, racks=racks, key=key, strict=strict, quiet=quiet
    )
    chosen = []
    for node in nodes:
        on_node = sorted(by_node[node], key=str)
        chosen.append((on_node[key % len(on_node)], node))
    return tuple(chosen)
