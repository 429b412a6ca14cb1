"""MemoryPool actors for units that hand their snapshots to pools themselves (pipeline stages, and
expert units shared by data-parallel replicas), and the reading of the pools' acknowledgements.

The fault manager (``control/pools.py``) runs the pools of ``zr.ExpertParallel`` alone; these are the
simpler pools of the mesh's roles: started once, on nodes that hold none of the units when there are
such nodes, killed with the units.
Touches Ray: pool start (``.remote`` with node affinity), ``ray.get`` of pings and acknowledgements.
"""

from __future__ import annotations

import logging
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from zetta_ray.actors.memory_pool import MemoryPoolActor

__all__ = ["start_pools", "unkept"]

logger = logging.getLogger(__name__)


def start_pools(
    avoid: set[str], replicas: int, pool_bytes: int, deadline_s: float, name: str = "stage-pool"
) -> list[Any]:
    """``replicas`` MemoryPool actors, on distinct live nodes outside ``avoid`` (the units' nodes) when
    there are such nodes, else on the units' own nodes (a snapshot then outlives a unit, not its node);
    started and answering within ``deadline_s``. Named ``{name}-{node}``."""
    alive = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
    nodes = ([n for n in alive if n not in avoid] or alive)[:replicas]
    if len(nodes) < replicas and len(alive) > 1:  # on one node there is no other place to be
        logger.warning("%s: %d pool(s) on distinct nodes, not the %d asked", name, len(nodes), replicas)
    pools = [
        MemoryPoolActor.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(
            pool_bytes, f"{name}-{node[:8]}"
        )
        for node in nodes
    ]
    ray.get([p.ping.remote() for p in pools], timeout=deadline_s)
    return pools


def unkept(acks: list[list[Any]], deadline_s: float, what: str) -> list[int]:
    """The units whose snapshot no pool kept: ``acks[u]`` are unit ``u``'s pools' acknowledgements of
    its ``put``s (empty: the unit sent none, and is not counted). A pool that failed is logged, naming
    ``what`` (another may hold the snapshot)."""
    missing = []
    for u, refs in enumerate(acks):
        held = 0
        for ref in refs:
            try:
                ray.get(ref, timeout=deadline_s)
                held += 1
            except (ray.exceptions.RayError, MemoryError) as e:
                logger.warning("%s of unit %d: a pool did not keep it: %s", what, u, e)
        if refs and not held:
            missing.append(u)
    return missing
