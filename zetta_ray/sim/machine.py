"""The simulated machine as ``zetta_ray.placement`` sees it, and where the experts of a plan go.

The simulator does not keep its own topology: ``topology_for`` turns the hardware figures into the
placement layer's ``Topology`` (nodes = the innermost tier's domains, racks = the next, pods = the
next, the fabric above), so failure domains, link tiers and the cost model are the ones the live
cluster uses. A million units take a fraction of a second to build.

``placement_summary`` places one expert group of the chosen mesh: one MoE layer's ``n_experts``
experts on the ``ep`` consecutive units of the first expert group, every unit of the group also
routing its own tokens (a dense unit in the placement layer's terms). Each unit has room for exactly
``n_experts / ep`` of them, because the rest of its memory holds its other layers. Every expert group
of every MoE layer sees the same units, links and load, so one group's plan, repeated by translation,
is the plan of the whole machine.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from zetta_ray.placement.cost import Workload, step_cost
from zetta_ray.placement.topology import Tier, Topology
from zetta_ray.sim.hardware import Hardware
from zetta_ray.sim.memory import memory_per_unit
from zetta_ray.sim.model import ModelSpec
from zetta_ray.sim.parallel import ParallelSpec

__all__ = ["placement_summary", "topology_for"]


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


def topology_for(hw: Hardware, *, kind: str = "gpu") -> Topology:
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
    return Workload(
        n_experts=model.n_experts,
        n_layers=1,
        top_k=model.top_k,
        d_model=model.hidden,
        d_ff=model.f,
        tokens_per_step=max(1, tokens),
        load=load,
        n_dense=par.ep,
        ffn_matrices=model.mlp_matrices,
        activation_bytes=2,
        param_bytes=4,
        optimizer_slots=2,
        expert_memory_bytes=int(hw.unit.hbm_bytes // max(1, per_unit)),
    )


def placement_summary(model: ModelSpec, par: ParallelSpec, hw: Hardware) -> dict[str, Any]:
    """Where one expert group's experts go and what the placement cost model predicts for them."""
    topo = topology_for(hw)
    work = group_workload(model, par, hw)
    group = np.arange(par.ep)
    per_unit = par.experts_per_unit(model)
    expert_unit = group[np.arange(model.n_experts) // per_unit]
    cost = step_cost(topo, work, expert_unit_X=expert_unit, dense_unit_D=group)
    mem = memory_per_unit(model, par)
    return {
        "source": "zetta_ray.placement: Topology, cost.step_cost (expert layout: contiguous blocks)",
        "topology": topo.summary(),
        "expert_groups": par.units // par.ep,
        "units_per_group": par.ep,
        "experts_per_unit_per_layer": per_unit,
        "group_spans": {
            "nodes": int(len(np.unique(topo.unit_node_U[group]))),
            "racks": int(len(np.unique(topo.unit_rack_U[group]))),
            "pods": int(len(np.unique(topo.unit_pod_U[group]))),
        },
        "moe_layer_time_per_step_s": float(cost.layer_time_s_L[0]),
        "bytes_by_tier_per_group_per_layer": cost.edges.bytes_by_tier(),
        "fabric_bytes_share": _share(cost.edges.bytes_by_tier(), Tier.FABRIC.name),
        "memory_per_unit_bytes": mem.total,
    }


def _share(by_tier: dict[str, float], name: str) -> float:
    total = sum(by_tier.values())
    return by_tier.get(name, 0.0) / total if total else 0.0
