"""Baseline placers: round-robin and random. They obey the same rules as ``place`` (memory, kinds,
failure domains) but ignore the cost model, so comparing them with ``place`` measures what topology and
load awareness buys. Both fall back to the next unit kind when memory runs out, as ``place`` does.
"""

from __future__ import annotations

import numpy as np

from zetta_ray.placement.cost import Workload
from zetta_ray.placement.plan import (
    NoRoom,
    Placement,
    PlacerConfig,
    assign_with_fallback,
    dense_candidates,
    expert_groups,
    finish,
    free_after_dense,
    usable_units,
)
from zetta_ray.placement.replicas import replicas_with_fallback
from zetta_ray.placement.topology import Topology

__all__ = ["random_placement", "round_robin"]


def round_robin(
    topology: Topology,
    workload: Workload,
    config: PlacerConfig | None = None,
    *,
    usable_U: np.ndarray | None = None,
) -> Placement:
    """Dense units on the first candidates; expert ``x`` on the next unit (in id order) after expert
    ``x - 1``'s that has room; each replica on the next allowed pool. ``config.seed`` is not used."""
    cfg = config or PlacerConfig()
    t, w = topology, workload
    usable = usable_units(t, usable_U)
    groups = expert_groups(t, w, cfg, usable)
    dense_D = dense_candidates(t, w, cfg, usable)[: w.n_dense]
    free_U = free_after_dense(t, w, dense_D)

    def cyclic(units: np.ndarray) -> np.ndarray:
        free, out, i = free_U.copy(), np.empty(w.total_experts, dtype=np.int64), 0
        for x, need in enumerate(w.memory_X):
            for step in range(len(units)):
                u = units[(i + step) % len(units)]
                if free[u] >= need:
                    break
            else:
                raise NoRoom(x)
            out[x], i = u, (i + step + 1) % len(units)
            free[u] -= need
        return out

    expert_X = assign_with_fallback(w, groups, free_U, cyclic)
    replica_XR = replicas_with_fallback(t, w, expert_X, "cyclic", np.random.default_rng(0))
    return finish(t, w, expert_X, dense_D, replica_XR, "round_robin", None)


def random_placement(
    topology: Topology,
    workload: Workload,
    config: PlacerConfig | None = None,
    *,
    usable_U: np.ndarray | None = None,
) -> Placement:
    """Dense units, experts and replicas each on a uniformly random allowed unit or pool with room,
    drawn from ``config.seed``."""
    cfg = config or PlacerConfig()
    t, w = topology, workload
    usable = usable_units(t, usable_U)
    rng = np.random.default_rng(cfg.seed)
    groups = expert_groups(t, w, cfg, usable)
    dense_D = rng.choice(dense_candidates(t, w, cfg, usable), size=w.n_dense, replace=False)
    free_U = free_after_dense(t, w, dense_D)

    def anywhere(units: np.ndarray) -> np.ndarray:
        free, out = free_U.copy(), np.empty(w.total_experts, dtype=np.int64)
        for x, need in enumerate(w.memory_X):
            room = units[free[units] >= need]
            if not len(room):
                raise NoRoom(x)
            out[x] = rng.choice(room)
            free[out[x]] -= need
        return out

    expert_X = assign_with_fallback(w, groups, free_U, anywhere)
    replica_XR = replicas_with_fallback(t, w, expert_X, "random", rng)
    return finish(t, w, expert_X, dense_D, replica_XR, "random", cfg.seed)
