"""The fault manager's ``Cluster`` seam (``control/seams.py``) on a real Ray cluster.

This is the one part of the fault manager that calls Ray: the node list, MemoryPool actors pinned to a
node, killing actors, waiting for and reading results, and pinning a replacement unit to a node. The
other parts take a ``Cluster`` so that unit tests can hand them a fake instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from zetta_ray.actors.memory_pool import MemoryPoolActor
from zetta_ray.control.liveness import raylet_answers
from zetta_ray.runtime.engine import by_value

__all__ = ["RayCluster"]


class RayCluster:
    """The cluster this process is connected to (``ray.init`` done by the caller)."""

    failure: type[Exception] = ray.exceptions.RayError  # GetTimeoutError is one too

    def nodes(self) -> list[dict[str, Any]]:
        return ray.nodes()

    def raylet_answers(self, node: dict[str, Any]) -> bool:
        return raylet_answers(node)

    def start_pool(self, node: str, limit_bytes: int, name: str) -> Any:
        return MemoryPoolActor.options(scheduling_strategy=self.node_affinity(node)).remote(limit_bytes, name)

    def kill(self, actor: Any) -> None:
        ray.kill(actor, no_restart=True)

    def get(self, refs: Any, timeout_s: float) -> Any:
        return ray.get(refs, timeout=timeout_s)

    def ready(self, refs: Sequence[Any], timeout_s: float) -> list[Any]:
        done, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
        return done

    def node_affinity(self, node: str) -> NodeAffinitySchedulingStrategy:
        return NodeAffinitySchedulingStrategy(node, soft=False)

    def by_value(self, args: tuple[Any, ...], timeout_s: float) -> tuple[Any, ...]:
        return by_value(args, timeout_s)
