"""Node liveness: which nodes are alive, asking a suspect node's raylet directly.

The cluster declares a node dead only after its health checks miss (1.5 s to 15 s, by its settings);
until then a unit lost with its node looks like a unit lost alone, and its node's other units and
replicas look usable. So the fault manager asks the raylet of a suspect node (one whose actor just
failed or does not answer) for a TCP connection: the kernel accepts for a live raylet however busy it
is; a killed one refuses at once, a dead host times out. A node found dead stays dead for the run (Ray
gives a restarted raylet a new node id).

No Ray here: the node list comes through the ``Cluster`` seam (``control/seams.py``). ``raylet_answers``
is the probe itself (a socket, no Ray); ``chaos.py`` uses it too, to see a killed node go.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterable, Sequence
from typing import Any

from zetta_ray.control.seams import Cluster

__all__ = ["Liveness", "raylet_answers"]

logger = logging.getLogger("zetta_ray.control.manager")  # the fault manager's log: one name for its parts

_PROBE_TIMEOUT_S = 2.0  # a raylet that does not accept a connection in this long is taken for dead


def raylet_answers(node: dict[str, Any]) -> bool:
    """Whether the raylet of ``node`` (a ``ray.nodes()`` entry) accepts a TCP connection. The kernel
    accepts for a live raylet however busy it is; a killed one refuses at once, a dead host times out."""
    try:
        with socket.create_connection(
            (node["NodeManagerAddress"], node["NodeManagerPort"]), timeout=_PROBE_TIMEOUT_S
        ):
            return True
    except OSError:
        return False


class Liveness:
    """The live nodes: those the cluster reports alive, less the ones found dead here."""

    def __init__(self, cluster: Cluster):
        self.cluster = cluster
        self.dead_nodes: set[str] = set()  # found dead before the cluster said so

    def live_nodes(self, suspects: Iterable[str] = ()) -> set[str]:
        """The nodes the cluster reports alive, less the ones found dead here.

        ``suspects`` are nodes of actors that just failed or do not answer; each one's raylet is asked
        (see the module docstring), and one that refuses is dead now and stays dead."""
        nodes = self.cluster.nodes()
        alive = {n["NodeID"] for n in nodes if n["Alive"]} - self.dead_nodes
        by_id = {n["NodeID"]: n for n in nodes}
        for node in set(suspects):
            if node in alive and not self.cluster.raylet_answers(by_id[node]):
                logger.warning("node %s: its raylet does not answer; taking the node for dead", node)
                self.dead_nodes.add(node)
                alive.discard(node)
        return alive

    def lost_units(self, units: list[int], unit_nodes: Sequence[str]) -> list[int]:
        """Those of ``units`` whose node (``unit_nodes[u]``) is dead, asking each node's raylet.

        The runtime asks while a wait drags on: a call to an actor on a node that died between two calls
        fails only when the cluster declares the node dead (about 15 s with Ray's default health checks),
        but the node's raylet refuses connections at once."""
        alive = self.live_nodes(suspects={unit_nodes[u] for u in units})
        return [u for u in units if unit_nodes[u] not in alive]
