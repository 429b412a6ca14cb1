"""Snapshot replicas onto memory pools, under the failure-domain rule (``zetta_ray/failure_domains.py``).

After every step (or every ``snapshot_every`` steps) each expert copies its state to ``replicas`` memory
pools. A replica must survive what kills its expert: it never sits on the expert's node, nor in the
expert's rack when the machine's pools span more than one rack, and the replicas of one expert sit on
distinct nodes. The plan applies the rule strictly: a replica no pool can take fails the plan.

Among the allowed pools the ``best`` policy takes the one that least raises the slower of (the expert
unit's snapshot port time, the pool's write time); ties go to the nearer, less loaded pool.

Speed: a pool in another pod costs at least the fabric link, so the expert's own pod is scored first and
the whole machine only when a remote pool could tie or win. The answer is the same; the work per
replica drops from all pools to one pod's pools on a large machine.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from zetta_ray.failure_domains import most_replicas, replica_allowed, spans_racks
from zetta_ray.placement.cost import Workload
from zetta_ray.placement.plan import InfeasiblePlacementError
from zetta_ray.placement.topology import Tier, Topology
from zetta_ray.quantities import gib

__all__ = ["MAX_DEFAULT_REPLICAS", "default_replicas", "place_replicas", "replicas_with_fallback"]

_TIE = 1e-9

#: Snapshot replicas per expert that ``zetta-ray plan`` asks for at most when ``--replicas`` is not given.
MAX_DEFAULT_REPLICAS = 2


def default_replicas(topology: Topology) -> int:
    """Snapshot replicas per expert when ``--replicas`` is not given: as many as any expert can have, up to 2.

    A replica never shares its expert's node (nor its rack when the memory pools span racks), so the
    count is the pool nodes outside the fullest rack (or, with one rack, the pool nodes but one), capped
    at ``MAX_DEFAULT_REPLICAS``: 0 on a single node, 1 on two nodes, 2 from three nodes on. Every unit
    stays eligible for experts, whatever its rack.
    """
    t = topology
    room = most_replicas(t.node_rack_N[np.unique(t.pool_node_P)].tolist())
    return max(0, min(MAX_DEFAULT_REPLICAS, room))


def place_replicas(
    topology: Topology,
    workload: Workload,
    expert_unit_X: np.ndarray,
    policy: Literal["best", "roomiest", "cyclic", "random"],
    rng: np.random.Generator,
) -> np.ndarray:
    """A pool for every replica: ``(X, R)`` pool ids. ``cyclic`` takes the next allowed pool after the
    last one used, ``random`` any allowed pool (from ``rng``), ``roomiest`` the one with the most free
    bytes, ``best`` as the module docstring says."""
    t, w = topology, workload
    out = np.full((w.total_experts, w.replicas), -1, dtype=np.int64)
    if w.replicas == 0:
        return out
    pools = _Pools(t, w)
    cursor = 0
    for x in range(w.total_experts):
        unit = int(expert_unit_X[x])
        node, rack, pod = int(t.unit_node_U[unit]), int(t.unit_rack_U[unit]), int(t.unit_pod_U[unit])
        taken: list[int] = []
        for r in range(w.replicas):
            p = -1
            if policy == "best":
                local = pools.allowed(pools.in_pod(pod), node, rack, taken)
                if len(local):
                    low, p = pools.best(local, unit, node)
                    if low * (1 + _TIE) >= pools.port_s.get(unit, 0.0) + pools.link_T[Tier.FABRIC]:
                        p = -1  # a pool in another pod might tie or win: look everywhere
            if p < 0:
                idx = pools.allowed(np.arange(t.n_pools), node, rack, taken)
                if not len(idx):
                    raise _no_pool(t, w, x, r, node, rack, pools)
                if policy == "best":
                    p = pools.best(idx, unit, node)[1]
                elif policy == "roomiest":
                    p = int(idx[np.argmax(pools.free_P[idx])])
                elif policy == "cyclic":
                    later = idx[idx >= cursor]
                    p = int(later[0] if len(later) else idx[0])
                    cursor = p + 1
                else:
                    p = int(rng.choice(idx))
            out[x, r] = p
            taken.append(int(t.pool_node_P[p]))
            pools.take(p, unit, node)
    return out


def replicas_with_fallback(
    topology: Topology,
    workload: Workload,
    expert_unit_X: np.ndarray,
    policy: Literal["best", "roomiest", "cyclic", "random"],
    rng: np.random.Generator,
) -> np.ndarray:
    """``place_replicas`` with ``policy``, then ``roomiest`` and ``cyclic`` if it strands a replica.

    Each policy is greedy, one expert at a time, so one can fill the pools an expert needed while another
    order of choices fits everyone; ``roomiest`` spreads the bytes as evenly as the rule allows. The
    first policy's error is raised when all fail.
    """
    first: InfeasiblePlacementError | None = None
    for name in dict.fromkeys([policy, "roomiest", "cyclic"]):
        try:
            return place_replicas(topology, workload, expert_unit_X, name, rng)
        except InfeasiblePlacementError as e:
            first = first or e
    raise first


class _Pools:
    """What the pools hold so far: free bytes, write seconds per step, and each unit's snapshot port time."""

    def __init__(self, t: Topology, w: Workload) -> None:
        self.t, self.size = t, float(w.snapshot_bytes)
        per_step = w.snapshot_bytes / w.snapshot_every
        self.free_P = t.pool_memory_P.astype(np.float64)
        self.load_P = np.zeros(t.n_pools)
        self.write_P = per_step / t.pool_bandwidth_P
        self.link_T = per_step / t.links.bandwidth_T
        self.rack_rule = spans_racks(np.unique(t.pool_rack_P).tolist())
        pool_pod_P = t.rack_pod_R[t.pool_rack_P]
        self.by_pod = np.argsort(pool_pod_P, kind="stable")
        self.bounds = np.searchsorted(pool_pod_P[self.by_pod], np.arange(t.n_pods + 1))
        self.port_s: dict[int, float] = {}

    def in_pod(self, pod: int) -> np.ndarray:
        return self.by_pod[self.bounds[pod] : self.bounds[pod + 1]]

    def allowed(self, idx: np.ndarray, node: int, rack: int, taken: list[int]) -> np.ndarray:
        """The pools of ``idx`` with room, off ``node`` (and ``rack``, by the rule) and ``taken`` nodes."""
        ok = replica_allowed(
            self.t.pool_node_P[idx],
            self.t.pool_rack_P[idx],
            unit_node=node,
            unit_rack=rack,
            taken=taken,
            rack_rule=self.rack_rule,
        )
        return idx[ok & (self.free_P[idx] >= self.size)]

    def best(self, idx: np.ndarray, unit: int, node: int) -> tuple[float, int]:
        """The lowest score among ``idx`` and the pool that has it (ties: nearer, then less loaded)."""
        link = self.link_T[self.t.node_tier(node, self.t.pool_node_P[idx])]
        pool_new = self.load_P[idx] + self.write_P[idx]
        score = np.maximum(self.port_s.get(unit, 0.0) + link, pool_new)
        low = score.min()
        near = np.flatnonzero(score <= low * (1 + _TIE))
        return float(low), int(idx[near[np.argmin(link[near] + pool_new[near])]])

    def take(self, p: int, unit: int, node: int) -> None:
        self.free_P[p] -= self.size
        self.load_P[p] += self.write_P[p]
        link = float(self.link_T[self.t.node_tier(node, self.t.pool_node_P[p])])
        self.port_s[unit] = self.port_s.get(unit, 0.0) + link


def _no_pool(
    t: Topology, w: Workload, x: int, r: int, node: int, rack: int, pools: _Pools
) -> InfeasiblePlacementError:
    layer, expert = w.expert_id(x)
    where = f"outside node {t.node_name(node)}" + (
        f" and rack {t.rack_name(rack)}" if pools.rack_rule else ""
    )
    hint = (
        "A single-node machine has no such pool: plan it with Workload(replicas=0)."
        if t.n_nodes == 1
        else "Add memory pools on other nodes (or racks), or lower Workload.replicas."
    )
    return InfeasiblePlacementError(
        f"replica {r} of expert L{layer}/E{expert} needs a memory pool {where}, apart from its other "
        f"replicas, with {gib(w.snapshot_bytes)} free; none of the {t.n_pools} pool(s) qualifies "
        f"({gib(float(pools.free_P.sum()))} free in all). {hint}"
    )
