"""A placement plan, its rules, and the pieces every placer shares (kind choice, replicas, checks).

Shape legend: X = all experts (flat id ``layer * E + expert``), D = dense units, R = replicas per
expert, U = units, P = memory pools.

**The rules a plan obeys** (``check_placement`` verifies them; every placer here produces only plans
that pass):

1. *Memory.* The experts and dense units on a unit fit its memory; the replicas on a pool fit the pool.
2. *Kinds.* Experts run on the first of ``PlacerConfig.expert_kinds`` the machine has (npu by
   default), dense units on the first of ``dense_kinds`` (gpu). The next kind in the list is used only
   when the preferred ones lack the memory (experts) or the count (dense units). Kinds not listed are
   never used.
3. *Failure domains.* A snapshot replica never shares a node with its expert, nor a rack when the
   machine's pools span more than one rack; the replicas of one expert sit on distinct nodes. So losing
   one node (or rack) never loses an expert together with its only snapshot.

A request that cannot obey them raises ``InfeasiblePlacementError`` naming what is missing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from zetta_ray.errors import ConfigError, InfeasiblePlacementError, PlacementError
from zetta_ray.placement.cost import TOKENS, StepCost, Workload, step_cost
from zetta_ray.placement.topology import Tier, Topology
from zetta_ray.quantities import gib

__all__ = [
    "InfeasiblePlacementError",
    "Placement",
    "PlacementError",
    "PlacerConfig",
    "check_placement",
]


@dataclass(kw_only=True, slots=True)
class PlacerConfig:
    """How to place. ``seed`` breaks ties among equivalent units (same result for the same seed)."""

    seed: int = 0
    expert_kinds: tuple[str, ...] = ("npu", "gpu", "cpu")
    dense_kinds: tuple[str, ...] = ("gpu", "npu", "cpu")
    rounds: int = 2
    max_moves: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"PlacerConfig.seed={self.seed!r} is invalid: must be an integer >= 0")
        for name in ("expert_kinds", "dense_kinds"):
            kinds = getattr(self, name)
            if isinstance(kinds, str) or not kinds or not all(isinstance(k, str) for k in kinds):
                raise ConfigError(f"PlacerConfig.{name}={kinds!r} must be a non-empty tuple of kind names")
            setattr(self, name, tuple(kinds))
        if self.rounds < 1:
            raise ConfigError(f"PlacerConfig.rounds={self.rounds} must be >= 1")
        if self.max_moves is not None and self.max_moves < 0:
            raise ConfigError(f"PlacerConfig.max_moves={self.max_moves} must be >= 0, or None (automatic)")


@dataclass(kw_only=True, slots=True, eq=False)
class Placement:
    """Where everything goes, and what the cost model predicts for it.

    ``expert_unit_X[x]`` is the unit of expert ``x = layer * n_experts + expert``; ``dense_unit_D`` the
    dense/router units; ``replica_pool_XR[x, r]`` the memory pool of replica ``r`` of expert ``x``.
    """

    expert_unit_X: np.ndarray
    dense_unit_D: np.ndarray
    replica_pool_XR: np.ndarray
    n_experts: int
    cost: StepCost
    method: str
    seed: int | None = None

    @property
    def step_time_s(self) -> float:
        return self.cost.step_time_s

    def unit_of(self, layer: int, expert: int) -> int:
        return int(self.expert_unit_X[layer * self.n_experts + expert])

    def experts_on(self, unit: int) -> list[tuple[int, int]]:
        """``(layer, expert)`` pairs placed on ``unit``, in flat-id order."""
        return [divmod(int(x), self.n_experts) for x in np.flatnonzero(self.expert_unit_X == unit)]

    def table(self, topology: Topology, workload: Workload) -> list[dict[str, Any]]:
        """One JSON-ready row per expert: unit, node, load, compute time, and its links: every edge it
        has this step (token rows to and from each dense unit, snapshots to each replica pool), with the
        peer, the tier and the bytes."""
        t, edges = topology, self.cost.edges
        order = np.argsort(edges.expert_Y, kind="stable")
        bounds = np.searchsorted(edges.expert_Y[order], np.arange(len(self.expert_unit_X) + 1))
        tokens_Y = edges.kind_Y == TOKENS
        peer_node_Y = np.where(
            tokens_Y, t.unit_node_U[edges.src_Y], t.pool_node_P[np.where(tokens_Y, 0, edges.dst_Y)]
        )
        load_X = workload.load_LE.reshape(-1)
        rows = []
        for x, unit in enumerate(self.expert_unit_X):
            mine = order[bounds[x] : bounds[x + 1]]
            info = t.unit_info(int(unit))
            links = [
                {
                    "kind": "tokens" if tokens_Y[y] else "snapshot",
                    "peer": f"unit {edges.src_Y[y]}" if tokens_Y[y] else f"pool {edges.dst_Y[y]}",
                    "peer_node": t.node_name(int(peer_node_Y[y])),
                    "tier": Tier(int(edges.tier_Y[y])).name,
                    "bytes": float(edges.bytes_Y[y]),
                }
                for y in mine
            ]
            layer, expert = divmod(x, self.n_experts)
            rows.append(
                {
                    "layer": layer,
                    "expert": expert,
                    "unit": int(unit),
                    "kind": info["kind"],
                    "node": info["node"],
                    "rack": info["rack"],
                    "load": float(load_X[x]),
                    "compute_s": float(self.cost.expert_compute_s_X[x]),
                    "token_bytes": float(edges.bytes_Y[mine[tokens_Y[mine]]].sum()),
                    "replica_pools": [int(p) for p in self.replica_pool_XR[x]],
                    "links": links,
                }
            )
        return rows

    def to_dict(self, topology: Topology, workload: Workload) -> dict[str, Any]:
        """The whole plan as JSON-ready data (what ``zetta-ray plan --json`` writes)."""
        return {
            "method": self.method,
            "seed": self.seed,
            "topology": topology.summary(),
            "cost": self.cost.to_dict(),
            "dense": [topology.unit_info(int(u)) for u in self.dense_unit_D],
            "experts": self.table(topology, workload),
        }


# -- shared by every placer -----------------------------------------------------------------------------


def kinds_present(topology: Topology, usable_U: np.ndarray) -> dict[str, int]:
    return {k: int(np.sum(usable_U & (topology.unit_kind_U == c))) for c, k in enumerate(topology.kinds)}


def replica_capable(topology: Topology, workload: Workload) -> np.ndarray:
    """Bool per unit: an expert there can have its ``replicas`` on distinct pool nodes the failure-domain
    rule allows (pools big enough for one snapshot, off its node, and off its rack when racks count)."""
    t = topology
    if workload.replicas == 0:
        return np.ones(t.n_units, dtype=bool)
    big = t.pool_node_P[t.pool_memory_P >= workload.snapshot_bytes]
    has_pool_N = np.zeros(t.n_nodes, dtype=bool)
    has_pool_N[big] = True
    if len(np.unique(t.pool_rack_P)) > 1:
        near = np.bincount(t.node_rack_N, weights=has_pool_N, minlength=t.n_racks)[t.unit_rack_U]
    else:
        near = has_pool_N[t.unit_node_U]
    return has_pool_N.sum() - near >= workload.replicas


def expert_groups(topology: Topology, workload: Workload, config: PlacerConfig, usable_U: np.ndarray) -> list:
    """Candidate expert units, one array per kind of ``expert_kinds`` present, in preference order.

    Units from which an expert's replicas could not obey the failure-domain rule are left out.
    """
    t = topology
    capable = replica_capable(t, workload)
    groups, seen = [], 0
    for kind in config.expert_kinds:
        units = t.units_of_kind(kind)
        units = units[usable_U[units]]
        seen += len(units)
        units = units[capable[units]]
        if len(units):
            groups.append(units)
    if groups:
        return groups
    if seen:
        rule = "off its node and rack" if len(np.unique(t.pool_rack_P)) > 1 else "off its node"
        raise InfeasiblePlacementError(
            f"{workload.replicas} snapshot replica(s) per expert need that many pool nodes {rule}, each "
            f"with {gib(workload.snapshot_bytes)}; no {'/'.join(config.expert_kinds)} unit has them (the "
            f"machine has {int((t.pool_memory_P >= workload.snapshot_bytes).sum())} such pool(s) on "
            f"{t.n_nodes} node(s)). Add memory pools on other nodes and racks, or lower Workload.replicas"
            + (" (a single-node machine needs replicas=0)" if t.n_nodes == 1 else "")
        )
    raise InfeasiblePlacementError(
        f"no unit of kind {' or '.join(config.expert_kinds)} to host experts; the usable units are "
        f"{kinds_present(t, usable_U)}. Add such units (e.g. zr.init(units={{'npu': 8}}) or a Ray "
        "node with resources {'npu': N}), or list the kinds you have in PlacerConfig(expert_kinds=...)"
    )


def dense_candidates(topology: Topology, workload: Workload, config: PlacerConfig, usable_U: np.ndarray):
    """Units that may hold a dense unit: the preferred ``dense_kinds`` first, the next kind added only
    while there are fewer than ``n_dense`` units with ``dense_memory_bytes`` of memory."""
    parts: list[np.ndarray] = []
    for kind in config.dense_kinds:
        if sum(len(p) for p in parts) >= workload.n_dense:
            break
        units = topology.units_of_kind(kind)
        parts.append(units[usable_U[units] & (topology.unit_memory_U[units] >= workload.dense_memory_bytes)])
    cands = np.concatenate(parts)
    if len(cands) < workload.n_dense:
        raise InfeasiblePlacementError(
            f"the workload needs {workload.n_dense} dense unit(s) of kind {' or '.join(config.dense_kinds)}"
            + (f" with >= {gib(workload.dense_memory_bytes)} each" if workload.dense_memory_bytes else "")
            + f", but only {len(cands)} exist (usable units: "
            f"{kinds_present(topology, usable_U)}). Lower Workload.n_dense, add units, or widen "
            "PlacerConfig(dense_kinds=...)"
        )
    return cands


def usable_units(topology: Topology, usable_U: np.ndarray | None) -> np.ndarray:
    """The bool mask of units a placer may use (all when None)."""
    if usable_U is None:
        return np.ones(topology.n_units, dtype=bool)
    usable = np.asarray(usable_U)
    if usable.dtype != bool or usable.shape != (topology.n_units,):
        raise PlacementError(
            f"usable_U must be a bool mask of shape ({topology.n_units},), got {usable.dtype} {usable.shape}"
        )
    return usable


def free_after_dense(topology: Topology, workload: Workload, dense_D: np.ndarray) -> np.ndarray:
    """Bytes free on every unit once the dense units hold their ``dense_memory_bytes``."""
    free_U = topology.unit_memory_U.astype(np.float64)
    np.subtract.at(free_U, dense_D, float(workload.dense_memory_bytes))
    return free_U


class NoRoom(Exception):
    """Internal: expert ``x`` found no candidate unit with enough free memory."""

    def __init__(self, x: int):
        super().__init__(x)
        self.x = x


def assign_with_fallback(
    workload: Workload,
    groups: list[np.ndarray],
    free_U: np.ndarray,
    assign: Callable[[np.ndarray], np.ndarray],
) -> np.ndarray:
    """Run ``assign(candidate units)`` on the preferred kind, adding the next kind while memory runs out."""
    need = float(workload.memory_X.sum())
    last = int(np.argmax(workload.memory_X))
    for k in range(1, len(groups) + 1):
        units = np.concatenate(groups[:k])
        if float(np.clip(free_U[units], 0, None).sum()) < need:
            continue
        try:
            return assign(units)
        except NoRoom as e:
            last = e.x
    raise memory_error(workload, np.concatenate(groups), free_U, last)


def memory_error(
    workload: Workload, units: np.ndarray, free_U: np.ndarray, x: int
) -> InfeasiblePlacementError:
    """Name what runs out: the total, or (when the total fits) the room left for one expert."""
    free = np.clip(free_U[units], 0, None)
    total, have = float(workload.memory_X.sum()), float(free.sum())
    if total > have:
        why = (
            f"the experts need {gib(total)} in all, the {len(units)} candidate unit(s) have {gib(have)} free"
        )
    else:
        layer, expert = workload.expert_id(x)
        need, most = gib(float(workload.memory_X[x])), gib(float(free.max(initial=0)))
        why = (
            f"expert L{layer}/E{expert} needs {need} and no candidate unit has that much left beside the "
            f"other experts (the roomiest has {most} free before any expert)"
        )
    return InfeasiblePlacementError(
        f"not enough unit memory: {why}. Add units or memory, or shrink the experts (fewer experts, smaller "
        "d_ff, fewer tokens per step)"
    )


def finish(
    topology: Topology,
    workload: Workload,
    expert_unit_X: np.ndarray,
    dense_unit_D: np.ndarray,
    replica_pool_XR: np.ndarray,
    method: str,
    seed: int | None,
) -> Placement:
    cost = step_cost(
        topology,
        workload,
        expert_unit_X=expert_unit_X,
        dense_unit_D=dense_unit_D,
        replica_pool_XR=replica_pool_XR,
    )
    return Placement(
        expert_unit_X=np.asarray(expert_unit_X, dtype=np.int64),
        dense_unit_D=np.asarray(dense_unit_D, dtype=np.int64),
        replica_pool_XR=replica_pool_XR,
        n_experts=workload.n_experts,
        cost=cost,
        method=method,
        seed=seed,
    )


def check_placement(
    topology: Topology, workload: Workload, placement: Placement, config: PlacerConfig | None = None
) -> None:
    """Raise ``PlacementError`` naming every rule the placement breaks (memory, kinds, failure domains)."""
    t, w, p = topology, workload, placement
    cfg = config or PlacerConfig()
    problems: list[str] = []
    used_U = np.bincount(p.expert_unit_X, weights=w.memory_X, minlength=t.n_units)
    used_U += np.bincount(p.dense_unit_D, minlength=t.n_units) * float(w.dense_memory_bytes)
    over = np.flatnonzero(used_U > t.unit_memory_U)
    problems += [f"unit {u} holds {gib(used_U[u])} > its {gib(t.unit_memory_U[u])}" for u in over[:5]]
    if len(np.unique(p.dense_unit_D)) != len(p.dense_unit_D):
        problems.append(f"dense units repeat: {p.dense_unit_D.tolist()}")
    for role, units, kinds in (
        ("expert", p.expert_unit_X, cfg.expert_kinds),
        ("dense", p.dense_unit_D, cfg.dense_kinds),
    ):
        bad = sorted({t.kinds[k] for k in t.unit_kind_U[units]} - set(kinds))
        if bad:
            problems.append(f"{role} units of kind(s) {bad}, outside {role}_kinds={kinds}")
    if w.replicas:
        pools = p.replica_pool_XR
        if pools.shape != (w.total_experts, w.replicas) or pools.min() < 0:
            problems.append(
                f"replica_pool_XR has shape {pools.shape} or unplaced replicas (-1); need "
                f"({w.total_experts}, {w.replicas}) pool ids"
            )
        else:
            pool_used = np.bincount(pools.reshape(-1), minlength=t.n_pools) * float(w.snapshot_bytes)
            problems += [
                f"pool {q} holds {gib(pool_used[q])} > its {gib(t.pool_memory_P[q])}"
                for q in np.flatnonzero(pool_used > t.pool_memory_P)[:5]
            ]
            node_XR = t.pool_node_P[pools]
            same_node = np.flatnonzero((node_XR == t.unit_node_U[p.expert_unit_X][:, None]).any(1))
            problems += [f"expert {w.expert_id(x)} has a replica on its own node" for x in same_node[:5]]
            if len(np.unique(t.pool_rack_P)) > 1:
                same_rack = np.flatnonzero(
                    (t.pool_rack_P[pools] == t.unit_rack_U[p.expert_unit_X][:, None]).any(1)
                )
                problems += [f"expert {w.expert_id(x)} has a replica in its own rack" for x in same_rack[:5]]
            dup = [x for x in range(w.total_experts) if len(set(node_XR[x])) < w.replicas]
            problems += [f"expert {w.expert_id(x)} has two replicas on one node" for x in dup[:5]]
    if problems:
        raise PlacementError(f"placement ({p.method}) breaks the placement rules: " + "; ".join(problems))
