"""MemoryPool lifecycle: one pool per live node at the start, a new one where one died on a live node.

A MemoryPool actor (``actors/memory_pool.py``) holds snapshot replicas with a byte limit
(``TrickleCheckpoint.pool_bytes``, read from the config whenever a pool starts). Pools are named
``pool-<node[:8]>-<n>``, ``n`` counting every pool started; a dead pool keeps its name in ``dead`` (its
replicas are gone; a replica that names it is never restored from) and its node in ``nodes``.

No Ray here: pools are started, pinged and killed through the ``Cluster`` seam (``control/seams.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterable

from zetta_ray.checkpoint import TrickleCheckpoint
from zetta_ray.control.seams import Cluster, PoolActor

__all__ = ["PoolSet"]

logger = logging.getLogger("zetta_ray.control.manager")  # the fault manager's log: one name for its parts

_PING_TIMEOUT_S = 5.0  # a pool that does not answer a ping in this long is taken for dead


class PoolSet:
    """The MemoryPool actors of one job: their handles, nodes, and which died."""

    def __init__(self, config: TrickleCheckpoint, cluster: Cluster):
        self.config = config
        self.cluster = cluster
        self.handles: dict[str, PoolActor] = {}
        self.nodes: dict[str, str] = {}  # pool -> its node, dead pools included
        self.dead: set[str] = set()

    def start(self, node: str) -> None:
        """Start a pool on ``node``."""
        pid = f"pool-{node[:8]}-{len(self.handles)}"
        self.handles[pid] = self.cluster.start_pool(node, self.config.pool_bytes, pid)
        self.nodes[pid] = node

    def wait_started(self, timeout_s: float) -> None:
        """Wait until every pool answers a ping; raise ``Cluster.failure`` if one does not in time."""
        self.cluster.get([h.ping.remote() for h in self.handles.values()], timeout_s)

    def alive(self, pool: str) -> bool:
        """Whether ``pool`` answers a ping within ``_PING_TIMEOUT_S``."""
        try:
            self.cluster.get(self.handles[pool].ping.remote(), _PING_TIMEOUT_S)
            return True
        except self.cluster.failure:
            return False

    def live(self) -> dict[str, str]:
        """The pools not known dead: pool -> node."""
        return {p: n for p, n in self.nodes.items() if p not in self.dead}

    def mark_dead_off(self, alive: Collection[str]) -> None:
        """Every pool on a node not in ``alive`` is dead."""
        self.dead |= {p for p, n in self.nodes.items() if n not in alive}

    def replace(self, pool: str, live_nodes: Callable[[Iterable[str]], set[str]]) -> None:
        """``pool`` died: its replicas are gone; a new pool on the same node (if ``live_nodes``, asked
        with the node as a suspect, says it lives) takes the next snapshots."""
        self.dead.add(pool)
        node = self.nodes[pool]
        alive = live_nodes([node])
        logger.warning("MemoryPool %s died; %s", pool, "starting a new one" if node in alive else "node gone")
        if node in alive:
            self.start(node)

    def kill_all(self) -> None:
        """Kill every pool (the job is closing)."""
        for handle in self.handles.values():
            self.cluster.kill(handle)
        self.handles.clear()
