"""The slice scheduler: a slice plan becomes one Ray placement group (the only Ray-facing file here).

Each compute unit, and each spare, gets one bundle pinned to the node its plan names (Ray's
``ray.io/node-id`` label). Feasibility is decided from the live cluster before any placement group
exists, so a request the cluster can never hold is an error within a second, not a group left pending.
The plan takes the whole cluster; when another slice (of this job or another) holds some of the units
it names, the slice is planned again on what is free, or waits ``SliceRequest.ready_timeout_s`` for
them and then fails with the same kind of error.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from zetta_ray.errors import InfeasibleSliceError
from zetta_ray.placement.cost import Workload
from zetta_ray.placement.plan import PlacerConfig
from zetta_ray.placement.ray_nodes import DEFAULT_KIND_RESOURCES
from zetta_ray.placement.slice_plan import SlicePlan, SliceRequest, plan_replica_slice, plan_slice
from zetta_ray.placement.topology import Topology

__all__ = ["Slice", "live_topology", "reserve_replica_slice", "reserve_slice"]

_EPS = 1e-9
_BUSY_S = 2.0  # a group on free units is ready in well under this (Ray commits it in ~0.1 s)


def _unit_cpus(request: SliceRequest, nodes: list[dict[str, Any]]) -> float:
    """The CPU share of one cpu unit: as asked, else the cluster's CPUs shared evenly, at most one."""
    if request.unit_cpus is not None:
        return request.unit_cpus
    total = sum(float(n["Resources"].get("CPU", 0.0)) for n in nodes)
    units = max(request.units + request.spares, request.mesh_units or 0)
    return min(1.0, total / units) if total else 1.0


def _free_nodes(nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``nodes`` with what is free on each now as its resources: another slice's placement group (a
    second module in the same job, another job) holds the rest. Ray's resource view lags a change by
    a moment; a plan on it that turns out busy waits like any other."""
    # a DeveloperAPI (Ray Serve and ray.util.tpu use it); the public one sums over the whole cluster
    available = ray._private.state.available_resources_per_node()
    free = []
    for n in nodes:  # Ray leaves out what is all in use
        left = available.get(n["NodeID"], {})
        free.append({**n, "Resources": {k: float(left.get(k, 0.0)) for k in n.get("Resources") or {}}})
    return free


def live_topology(nodes: list[dict[str, Any]], cpu_unit: float = 1.0) -> Topology:
    """The live cluster as a Topology; a cpu unit is ``cpu_unit`` CPUs (fractions share a core)."""
    scaled = []
    for n in nodes:
        res = dict(n.get("Resources") or {})
        if "CPU" in res and cpu_unit > 0:
            res["CPU"] = res["CPU"] / cpu_unit + _EPS
        scaled.append({**n, "Resources": res})
    return Topology.from_ray_nodes(scaled)


@dataclass(frozen=True, slots=True)
class _Bundle:
    index: int
    role: str  # "unit" or "spare"
    unit: int  # topology unit
    node_id: str
    resources: dict[str, float]


class Slice:
    """A reserved slice: the placement group, its bundles, and the plan behind them."""

    def __init__(self, plan: SlicePlan, topology: Topology, pg: PlacementGroup, bundles: list[_Bundle]):
        self.plan = plan
        self.topology = topology
        self.pg = pg
        self.bundles = bundles

    @property
    def units(self) -> list[_Bundle]:
        return [b for b in self.bundles if b.role == "unit"]

    @property
    def spares(self) -> list[_Bundle]:
        return [b for b in self.bundles if b.role == "spare"]

    def actor_options(self, bundle: _Bundle) -> dict[str, Any]:
        """Ray actor options that launch an actor into ``bundle``, asking exactly for its resources."""
        res = dict(bundle.resources)
        opts: dict[str, Any] = {
            "num_cpus": res.pop("CPU", 0.0),
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                self.pg, placement_group_bundle_index=bundle.index
            ),
        }
        if "GPU" in res:
            opts["num_gpus"] = res.pop("GPU")
        if res:
            opts["resources"] = res
        return opts

    def remove(self) -> None:
        remove_placement_group(self.pg)


def _bundle_resources(kind: str, node: dict[str, Any], unit_cpus: float) -> dict[str, float]:
    if kind == "cpu":
        return {"CPU": unit_cpus}
    names = DEFAULT_KIND_RESOURCES.get(kind, (kind,))
    name = next(r for r in names if r in node["Resources"])
    return {name: 1.0, **({"CPU": unit_cpus} if unit_cpus else {})}


def reserve_replica_slice(
    request: SliceRequest, config: PlacerConfig | None = None, *, spread: bool = True, group: int = 1
) -> Slice:
    """A slice of dense units (``plan_replica_slice``: data-parallel replicas spread over failure
    domains, pipeline stages packed, or pipelines of ``group`` stages packed and spread), reserved as
    ``reserve_slice`` reserves one."""
    return reserve_slice(request, None, config, spread=spread, group=group)


def reserve_slice(
    request: SliceRequest,
    workload: Workload | None,
    config: PlacerConfig | None = None,
    *,
    spread: bool = True,
    group: int = 1,
) -> Slice:
    """Plan ``request`` on the live cluster and reserve it as one placement group (``workload`` None:
    a slice of dense replicas, with no experts to place).

    The plan takes the whole cluster (the same layout every time on the same cluster). When its group is
    not ready within ``_BUSY_S`` (another slice holds some of its units), the slice is planned again on
    what is free now, if it fits there, and waits for the rest of ``ready_timeout_s``.

    Raises ``InfeasibleSliceError`` (what is missing, the largest alternative) without creating a
    placement group when the cluster cannot hold the slice, and after ``ready_timeout_s`` when the
    resources exist but stay busy.
    """
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    cpu_unit = _unit_cpus(request, nodes)
    topology = live_topology(nodes, cpu_unit)

    def plan_on(t: Topology) -> SlicePlan:
        return (
            plan_replica_slice(t, request, config, spread=spread, group=group)
            if workload is None
            else plan_slice(t, workload, request, config)
        )

    plan = plan_on(topology)
    start = time.monotonic()
    bundles, pg = _reserve(plan, topology, nodes, request, cpu_unit)
    if not pg.wait(timeout_seconds=_whole_s(min(_BUSY_S, request.ready_timeout_s))):
        remove_placement_group(pg)
        try:
            free = live_topology(_free_nodes(nodes), cpu_unit)
            topology, plan = free, plan_on(free)
        except InfeasibleSliceError:  # busy everywhere it could go: wait for the first plan's units
            pass
        bundles, pg = _reserve(plan, topology, nodes, request, cpu_unit)
        if not pg.wait(timeout_seconds=_whole_s(request.ready_timeout_s - (time.monotonic() - start))):
            remove_placement_group(pg)
            raise InfeasibleSliceError(
                f"the slice ({len(plan.unit_U)} {plan.kind} units + {len(plan.spare_U)} spares) exists in "
                f"the cluster but its resources stayed busy for {request.ready_timeout_s:g} s; free them "
                "(other jobs or placement groups hold them), ask for fewer units, or raise "
                "SliceRequest.ready_timeout_s"
            )
    return Slice(plan, topology, pg, bundles)


def _whole_s(seconds: float) -> int:
    """``seconds`` for ``PlacementGroup.wait``, which takes whole seconds (it truncates): rounded up."""
    return max(math.ceil(seconds), 1)


def _reserve(
    plan: SlicePlan, topology: Topology, nodes: list[dict[str, Any]], request: SliceRequest, cpu_unit: float
) -> tuple[list[_Bundle], PlacementGroup]:
    """The bundles of ``plan``, each pinned to its node, and the placement group asked for them."""
    unit_cpus = cpu_unit if plan.kind == "cpu" else (request.unit_cpus or 0.0)
    by_id = {n["NodeID"]: n for n in nodes}
    bundles = []
    for role, units in (("unit", plan.unit_U), ("spare", plan.spare_U)):
        for u in units:
            node_id = plan.node_of(topology, u)
            res = _bundle_resources(plan.kind, by_id[node_id], unit_cpus)
            bundles.append(_Bundle(len(bundles), role, u, node_id, res))
    pg = placement_group(
        [b.resources for b in bundles],
        strategy="PACK",
        name=f"zetta_ray-slice-{uuid.uuid4().hex[:8]}",
        bundle_label_selector=[{"ray.io/node-id": b.node_id} for b in bundles],
    )
    return bundles, pg
