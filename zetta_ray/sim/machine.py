"""The simulated machine as ``zetta_ray.placement`` sees it, and where the experts of a plan go.

The simulator does not keep its own topology: ``topology_for`` turns the hardware figures into the
placement layer's ``Topology`` (nodes = the innermost tier's domains, racks = the next, pods = the
next, the fabric above), so failure domains, link tiers and the cost model are the ones the live
cluster uses. A million units take a fraction of a second to build.

``placement_summary`` runs the placement layer's placer (``zetta_ray.placement.placer.place``) on one
expert group of the chosen mesh: one MoE layer's ``n_experts`` experts onto the ``ep`` consecutive units
of the first expert group, every unit of the group also routing its own tokens (a dense unit in the
placement layer's terms), with one snapshot replica per expert in a memory pool outside the expert's
node and rack (the placer's failure-domain rule). Each unit has room for exactly ``n_experts / ep``
experts, because the rest of its memory holds its other layers. Every expert group of every MoE layer
sees the same units, links and load, so one group's plan, repeated by translation, is the plan of the
whole machine.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from zetta_ray.model_spec import ModelSpec
from zetta_ray.placement.cost import Workload
from zetta_ray.placement.placer import place
from zetta_ray.placement.plan import PlacementError, PlacerConfig
from zetta_ray.placement.topology import Topology
from zetta_ray.sim.hardware import Hardware
from zetta_ray.sim.parallel import ParallelSpec

__all__ = ["group_workload", "placement_summary", "topology_for"]

_KIND = "gpu"  # every simulated unit is one kind of accelerator; it hosts experts and dense layers


def _level_sizes(hw: Hardware) -> tuple[int, int, int]:
    """(units per node, nodes per rack, racks per pod) from the first three tiers' domains."""
    d = [hw.tiers[k].domain_units for k in range(len(hw.tiers))]
    node = d[0]
    rack = d[1] if len(d) > 2 else node
    pod = d[2] if len(d) > 3 else rack
    return node, max(1, rack // node), max(1, pod // rack)


def _link(hw: Hardware, k: int) -> dict[str, float]:
    k = min(k, len(hw.tiers) - 1)
    return {"bandwidth": hw.effective_bandwidth(k), "latency": hw.tiers[k].latency}


def topology_for(hw: Hardware, *, kind: str = _KIND) -> Topology:
    """The placement ``Topology`` of ``hw``: ``hw.units`` units of ``kind``, a memory pool per node."""
    per_node, nodes_per_rack, racks_per_pod = _level_sizes(hw)
    n_nodes = math.ceil(hw.units / per_node)
    node_type = {
        "units": [
            {"kind": kind, "count": per_node, "flops": hw.peak_flops, "memory": hw.unit.hbm_bytes},
        ],
        "pools": [
            {
                "memory": hw.memory_pool_bytes_per_unit * per_node,
                "bandwidth": hw.memory_pool_bandwidth * per_node,
            }
        ],
    }
    full_racks, rest_nodes = divmod(n_nodes, nodes_per_rack)
    full_pods, rest_racks = divmod(full_racks, racks_per_pod)
    rack = {"count": 1, "nodes": [{"type": "node", "count": nodes_per_rack}]}
    pods: list[dict[str, Any]] = []
    if full_pods:
        pods.append({"count": full_pods, "racks": [{**rack, "count": racks_per_pod}]})
    tail: list[dict[str, Any]] = []
    if rest_racks:
        tail.append({**rack, "count": rest_racks})
    if rest_nodes:
        tail.append({"count": 1, "nodes": [{"type": "node", "count": rest_nodes}]})
    if tail:
        pods.append({"count": 1, "racks": tail})
    n = len(hw.tiers)
    links = {name: _link(hw, k) for name, k in (("node", 0), ("rack", 1), ("pod", 2), ("fabric", n - 1))}
    spec = {"name": hw.name, "node_types": {"node": node_type}, "pods": pods, "links": links}
    return Topology.from_spec(spec)


def group_workload(model: ModelSpec, par: ParallelSpec, hw: Hardware) -> Workload:
    """One MoE layer of one expert group, per step, in the placement layer's workload terms."""
    per_unit = par.experts_per_unit(model)
    tokens = par.ep * par.micro_batch * model.seq_len // par.tp * par.micro_batches
    load = None
    if model.load_factor > 1:  # one hot expert per unit-share carries load_factor x its fair share
        load = np.ones(model.n_experts)
        load[::per_unit] = model.load_factor
    return Workload.from_model(  # one layer of the group: its routing is the load above, its memory HBM's
        model,
        tokens_per_step=max(1, tokens),
        n_layers=1,
        load=load,
        capacity_factor=None,
        n_dense=par.ep,
        dense_flops_per_step=0.0,
        dense_memory_bytes=0,
        activation_bytes=2,
        param_bytes=4,
        optimizer_slots=2,
        expert_memory_bytes=int(hw.unit.hbm_bytes // max(1, per_unit)),
    )


def placement_summary(model: ModelSpec, par: ParallelSpec, hw: Hardware, *, seed: int = 0) -> dict[str, Any]:
    """Place one expert group with the placement layer's placer; its plan, replicas and predicted time.

    The placer runs on the whole pods that hold the group (every other pod is a translated copy), so
    a million-unit plan takes seconds; the machine summary is of the full topology.
    """
    machine = topology_for(hw)
    pod_units = hw.domain(min(2, len(hw.tiers) - 1))
    region = hw.with_(units=min(hw.units, math.ceil(par.ep / pod_units) * pod_units))
    topo = topology_for(region)
    work = group_workload(model, par, hw)
    usable = np.zeros(topo.n_units, dtype=bool)
    usable[: par.ep] = True
    config = PlacerConfig(seed=seed, expert_kinds=(_KIND,), dense_kinds=(_KIND,))
    out: dict[str, Any] = {
        "source": "zetta_ray.placement: Topology, placer.place, cost.step_cost",
        "machine": machine.summary(),
        "placed_on_units": topo.n_units,
        "expert_groups": par.units // par.ep,
        "units_per_group": par.ep,
        "experts_per_unit_per_layer": par.experts_per_unit(model),
    }
    try:
        plan = place(topo, work, config, usable_U=usable)
    except PlacementError as e:
        out["error"] = str(e)
        return out
    group = np.unique(plan.dense_unit_D)
    pools = plan.replica_pool_XR.reshape(-1)
    by_tier = plan.cost.edges.bytes_by_tier()
    out.update(
        {
            "group_spans": {
                "nodes": int(len(np.unique(topo.unit_node_U[group]))),
                "racks": int(len(np.unique(topo.unit_rack_U[group]))),
                "pods": int(len(np.unique(topo.unit_pod_U[group]))),
            },
            "experts_per_unit_max": int(np.bincount(plan.expert_unit_X).max()),
            "replicas_off_node": bool(
                np.all(
                    topo.pool_node_P[pools] != np.repeat(topo.unit_node_U[plan.expert_unit_X], work.replicas)
                )
            ),
            "moe_layer_time_per_step_s": plan.step_time_s,
            "bytes_by_tier_per_group_per_layer": by_tier,
        }
    )
    return out
