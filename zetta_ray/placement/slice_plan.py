"""Slice planning: which units of the machine a job gets, and which experts go on each (pure, no Ray).

A *slice* is a job's share of the machine: ``units`` compute units of one kind for its experts, plus
``spares`` of the same kind held back for recovery. Planning runs the placer over every unit of the chosen
kind to learn where the experts want to be (the units it loads most, then those nearest the dense work),
takes that many units, and lays each layer's experts over them in equal shares, as expert parallelism
promises: heaviest expert first, onto the unit that would finish its share soonest, ties going to the
unit with the cheaper link to the dense work. ``slices.py`` turns the plan into a Ray placement group.

A slice of data-parallel dense replicas (``plan_replica_slice``) has no experts to place: its units are
spread over failure domains, a rack at a time, then a node at a time, so that one failure takes as few
replicas as it can (a dead replica is rebuilt from a live sibling, so siblings must outlive it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from zetta_ray.errors import ConfigError, InfeasibleSliceError
from zetta_ray.placement.cost import Workload
from zetta_ray.placement.placer import place
from zetta_ray.placement.plan import Placement, PlacerConfig, finish
from zetta_ray.placement.topology import Topology

__all__ = ["SlicePlan", "SliceRequest", "plan_replica_slice", "plan_slice"]


@dataclass(kw_only=True, slots=True, frozen=True)
class SliceRequest:
    """What a job asks for.

    ``kind`` None takes the first kind in ``PlacerConfig.expert_kinds`` (npu, then gpu, then cpu) that has
    room for ``units + spares``. ``unit_cpus`` is the CPU share of each unit's bundle: for cpu units it is
    the unit (None shares the cluster's CPUs evenly, at most one each); for npu/gpu units None means none.
    ``ready_timeout_s`` bounds the wait for resources that exist but are busy with other work.
    ``mesh_units``: all the units of the mesh this slice is part of (dense units and expert units are
    separate slices), so that an even share leaves room for the others; None: this slice's alone.
    """

    units: int
    kind: str | None = None
    spares: int = 0
    unit_cpus: float | None = None
    ready_timeout_s: float = 60.0
    mesh_units: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.units, int) or self.units < 1:
            raise ConfigError(f"SliceRequest.units={self.units!r} is invalid: must be a positive integer")
        if not isinstance(self.spares, int) or self.spares < 0:
            raise ConfigError(f"SliceRequest.spares={self.spares!r} is invalid: must be an integer >= 0")
        if self.unit_cpus is not None and not self.unit_cpus >= 0:
            raise ConfigError(f"SliceRequest.unit_cpus={self.unit_cpus!r} is invalid: must be >= 0, or None")
        if not self.ready_timeout_s > 0:
            raise ConfigError(
                f"SliceRequest.ready_timeout_s={self.ready_timeout_s!r} is invalid: must be > 0"
            )


@dataclass(frozen=True, slots=True)
class SlicePlan:
    """The chosen units and the expert layout over them.

    ``unit_U[i]`` is the topology unit of compute unit ``i``; ``spare_U`` the units held as spares;
    ``unit_LE[layer][expert]`` the compute unit (index into ``unit_U``) of each expert. A slice of dense
    replicas has no experts: ``unit_LE`` is empty and ``placement`` None.
    """

    kind: str
    unit_U: tuple[int, ...]
    spare_U: tuple[int, ...]
    unit_LE: tuple[tuple[int, ...], ...]
    placement: Placement | None

    def node_of(self, topology: Topology, unit: int) -> str:
        return topology.node_name(int(topology.unit_node_U[unit]))


def _choose_kind(topology: Topology, request: SliceRequest, config: PlacerConfig) -> str:
    need = request.units + request.spares
    have = {k: int(topology.units_of_kind(k).size) for k in topology.kinds}
    summary = ", ".join(f"{n} {k}" for k, n in have.items() if n) or "no units at all"
    if request.kind is not None:
        if have.get(request.kind, 0) >= need:
            return request.kind
        got = have.get(request.kind, 0)
        raise InfeasibleSliceError(
            f"the slice needs {need} {request.kind} units ({request.units} + {request.spares} spares) but "
            f"the cluster's {topology.n_nodes} alive node(s) have {got}: {need - got} {request.kind} missing "
            f"(the cluster has {summary}). {_largest(have, request)}"
        )
    for kind in config.expert_kinds:
        if have.get(kind, 0) >= need:
            return kind
    raise InfeasibleSliceError(
        f"the slice needs {need} units of one kind ({request.units} + {request.spares} spares) but the "
        f"cluster's {topology.n_nodes} alive node(s) have {summary}. {_largest(have, request)}"
    )


def _largest(have: dict[str, int], request: SliceRequest) -> str:
    """The largest request that fits: the asked kind first, else the kind with the most units."""
    kind = request.kind if have.get(request.kind or "", 0) else max(have, key=have.get, default=None)
    n = have.get(kind, 0) if kind else 0
    if n == 0:
        return (
            "No slice fits: add nodes, or declare units with zr.init(units={'npu': N}) or "
            "ray start --resources."
        )
    need = request.units + request.spares
    spares = min(request.spares, n - 1)
    fit = SliceRequest(units=min(request.units, n - spares), kind=kind, spares=spares)
    more = f"; or add nodes with {{{kind!r}: {need - n}}} more" if need > n else ""
    alt = f"SliceRequest(units={fit.units}, kind={kind!r}, spares={fit.spares})"
    return f"Largest feasible alternative: {alt}{more}."


def plan_slice(
    topology: Topology, workload: Workload, request: SliceRequest, config: PlacerConfig | None = None
) -> SlicePlan:
    """Choose ``request.units`` units (and spares) on ``topology`` and place ``workload``'s experts on them.

    Raises ``InfeasibleSliceError`` when the machine lacks the units (no placement group is made), and
    ``InfeasiblePlacementError`` when the units exist but cannot hold the experts (memory).
    """
    config = config or PlacerConfig()
    kind = _choose_kind(topology, request, config)
    candidates = topology.units_of_kind(kind)
    cfg = PlacerConfig(
        seed=config.seed,
        expert_kinds=(kind,),
        dense_kinds=config.dense_kinds,
        rounds=config.rounds,
        max_moves=config.max_moves,
    )
    mask = np.zeros(topology.n_units, dtype=bool)
    mask[candidates] = True
    first = place(topology, workload, cfg, usable_U=mask)
    load_U = np.bincount(first.expert_unit_X, weights=workload.flops_X, minlength=topology.n_units)
    # The units the placer loads most, then the rest of the candidates nearest the dense work.
    dense = int(first.dense_unit_D[0])
    tier_of = dict(zip(candidates.tolist(), topology.unit_tier(dense, candidates).tolist(), strict=True))
    order = sorted(tier_of, key=lambda u: (-load_U[u], tier_of[u], u))
    chosen = sorted(order[: request.units])
    taken = set(chosen)
    rest = [u for u in candidates.tolist() if u not in taken]
    per_node: dict[int, int] = {}
    for u in chosen:
        per_node[int(topology.unit_node_U[u])] = per_node.get(int(topology.unit_node_U[u]), 0) + 1
    # Spares go where the slice is thinnest, so one node failure does not take the spares with it.
    rest.sort(key=lambda u: (per_node.get(int(topology.unit_node_U[u]), 0), u))
    spares = tuple(sorted(rest[: request.spares]))
    unit_LE = _equal_shares(topology, workload, chosen, tier_of)
    expert_X = np.asarray([chosen[u] for units in unit_LE for u in units], dtype=np.int64)
    final = finish(
        topology,
        workload,
        expert_X,
        first.dense_unit_D,
        np.zeros((expert_X.size, 0), np.int64),
        "slice",
        cfg.seed,
    )
    return SlicePlan(kind=kind, unit_U=tuple(chosen), spare_U=spares, unit_LE=unit_LE, placement=final)


def _equal_shares(
    topology: Topology, workload: Workload, chosen: list[int], tier_of: dict[int, int]
) -> tuple[tuple[int, ...], ...]:
    """Each layer's experts over ``chosen`` in equal shares (longest-processing-time first); when the
    units do not divide the experts, shares differ by at most one."""
    n, E = len(chosen), workload.n_experts
    share = -(-E // n)
    flops_U = topology.unit_flops_U[chosen]
    load_LE = workload.load_LE
    layout = []
    for layer in range(workload.n_layers):
        busy = np.zeros(n)
        taken = np.zeros(n, dtype=np.int64)
        unit_E = [0] * E
        for e in sorted(range(E), key=lambda e: (-load_LE[layer, e], e)):
            finish_U = np.where(taken < share, busy + load_LE[layer, e] / flops_U, np.inf)
            u = min(range(n), key=lambda i: (finish_U[i], tier_of[chosen[i]], i))
            unit_E[e] = u
            busy[u] = finish_U[u]
            taken[u] += 1
        layout.append(tuple(unit_E))
    return tuple(layout)


def plan_replica_slice(
    topology: Topology,
    request: SliceRequest,
    config: PlacerConfig | None = None,
    *,
    spread: bool = True,
    group: int = 1,
) -> SlicePlan:
    """``request.units`` units of one kind (and its spares) for dense units. ``spread`` (data-parallel
    replicas): over failure domains, each pick taking the unit whose rack, then node, holds the fewest
    picks so far (ties: the lower unit id). Otherwise (pipeline stages, whose neighbours talk every
    micro-batch): packed, in (rack, node, unit) order, so that neighbours share a node where they can.
    ``group`` > 1 with ``spread`` (data-parallel pipelines of ``group`` stages): each run of ``group``
    units packed on one node where one has room, the runs spread over failure domains as single units
    are. Unit ``i`` is ``unit_U[i]``, in pick order.

    Raises ``InfeasibleSliceError`` when the machine lacks the units.
    """
    kind = _choose_kind(topology, request, config or PlacerConfig())
    left = topology.units_of_kind(kind).tolist()
    left.sort(key=lambda u: (int(topology.unit_rack_U[u]), int(topology.unit_node_U[u]), u))
    if not spread:
        return _dense_plan(kind, left[: request.units + request.spares], request.units)
    if group > 1:
        picks = _spread_groups(topology, left, request.units // group, group)
        return _dense_plan(kind, picks + [u for u in left if u not in picks][: request.spares], request.units)
    per_rack: dict[int, int] = {}
    per_node: dict[int, int] = {}
    picks: list[int] = []
    for _ in range(request.units + request.spares):
        u = min(
            left,
            key=lambda u: (
                per_rack.get(int(topology.unit_rack_U[u]), 0),
                per_node.get(int(topology.unit_node_U[u]), 0),
                u,
            ),
        )
        left.remove(u)
        picks.append(u)
        rack, node = int(topology.unit_rack_U[u]), int(topology.unit_node_U[u])
        per_rack[rack] = per_rack.get(rack, 0) + 1
        per_node[node] = per_node.get(node, 0) + 1
    return _dense_plan(kind, picks, request.units)


def _spread_groups(topology: Topology, packed: list[int], groups: int, size: int) -> list[int]:
    """``groups`` runs of ``size`` units from ``packed`` (in (rack, node, unit) order): each run from the
    node with room for all of it whose rack, then node, holds the fewest runs so far; a run that no
    node has room for takes the next units in packed order."""
    left = list(packed)
    per_rack: dict[int, int] = {}
    per_node: dict[int, int] = {}
    picks: list[int] = []
    for _ in range(groups):
        by_node: dict[int, list[int]] = {}
        for u in left:
            by_node.setdefault(int(topology.unit_node_U[u]), []).append(u)
        roomy = [(n, units) for n, units in by_node.items() if len(units) >= size]
        if roomy:
            _, units = min(
                roomy,
                key=lambda nu: (
                    per_rack.get(int(topology.unit_rack_U[nu[1][0]]), 0),
                    per_node.get(nu[0], 0),
                    nu[0],
                ),
            )
            run = units[:size]
        else:
            run = left[:size]
        for u in run:
            left.remove(u)
        picks += run
        rack, node = int(topology.unit_rack_U[run[0]]), int(topology.unit_node_U[run[0]])
        per_rack[rack] = per_rack.get(rack, 0) + 1
        per_node[node] = per_node.get(node, 0) + 1
    return picks


def _dense_plan(kind: str, picks: list[int], units: int) -> SlicePlan:
    """A plan of dense units: the first ``units`` picks, the rest spares; no experts to place."""
    return SlicePlan(
        kind=kind, unit_U=tuple(picks[:units]), spare_U=tuple(picks[units:]), unit_LE=(), placement=None
    )
