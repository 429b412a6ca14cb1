"""Reading the live cluster: ``ray.nodes()`` entries become the arrays of a ``Topology``.

This module does not import Ray: it takes the plain dicts that ``ray.nodes()`` returns, so it is tested
with hand-written dicts and a cluster-facing caller passes ``ray.nodes()`` straight in. The rules:

* **Nodes.** Every entry with ``Alive`` true is a node, named by its ``NodeID``. Dead entries are left
  out, so planning again after a node failure leaves the dead node's units out.
* **Units.** Each kind in ``kinds`` lists resource names; the first one a node has gives its count of that
  kind (``{"npu": 4}`` is four npu units; Ray's built-in ``GPU`` and ``CPU`` count as gpu and cpu units).
  A fractional count is rounded down.
* **Peak FLOP/s** per kind from ``flops`` (Ray does not know it; the defaults are rough figures).
* **Unit memory** per kind from ``unit_memory`` when given; otherwise the node's ``memory`` resource is
  split evenly over the node's units, which is the truth on a laptop where every unit is a process
  sharing one RAM.
* **Memory pools.** One per node, holding the node's ``object_store_memory`` bytes (Ray's object store is
  where snapshot replicas live), written at ``pool_bandwidth`` bytes/s.
* **Racks and pods.** The first of ``rack_labels`` in the node's ``Labels`` names its rack, else a
  resource ``rack:<name>``; likewise ``zone_labels`` / ``zone:<name>`` name the pod (Ray's zone). A node
  with neither is in rack ``"default"`` of pod ``"default"``, so a cluster without rack labels is one rack
  and the placer's rack rule does not apply.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from zetta_ray.errors import ConfigError

__all__ = ["DEFAULT_FLOPS", "DEFAULT_KIND_RESOURCES", "ray_node_fields"]

DEFAULT_KIND_RESOURCES: dict[str, tuple[str, ...]] = {
    "npu": ("npu", "NPU"),
    "gpu": ("gpu", "GPU"),
    "cpu": ("CPU",),
}
DEFAULT_FLOPS: dict[str, float] = {"npu": 400e12, "gpu": 1000e12, "cpu": 100e9}


def _site(node: Mapping[str, Any], label_keys: Sequence[str], prefix: str) -> str:
    labels = node.get("Labels") or {}
    for key in label_keys:
        if labels.get(key):
            return str(labels[key])
    tagged = sorted(r.split(":", 1)[1] for r in (node.get("Resources") or {}) if r.startswith(f"{prefix}:"))
    return tagged[0] if tagged else "default"


def ray_node_fields(
    nodes: Sequence[Mapping[str, Any]],
    *,
    kinds: Mapping[str, Sequence[str]] | None = None,
    flops: Mapping[str, float] | None = None,
    unit_memory: Mapping[str, int] | None = None,
    pool_bandwidth: float = 20e9,
    rack_labels: Sequence[str] = ("rack", "zetta.io/rack"),
    zone_labels: Sequence[str] = ("ray.io/availability-zone", "zone"),
    links: Any = None,
    name: str = "ray",
) -> dict[str, Any]:
    """Keyword arguments for ``Topology(...)`` from ``ray.nodes()`` entries (see the module docstring)."""
    kinds = dict(DEFAULT_KIND_RESOURCES if kinds is None else kinds)
    flops = {**DEFAULT_FLOPS, **(flops or {})}
    missing = sorted(k for k in kinds if k not in flops)
    if missing:
        raise ConfigError(f"no peak FLOP/s for unit kind(s) {missing}; pass flops={{{missing[0]!r}: ...}}")
    kind_list = tuple(kinds)
    pods: dict[str, int] = {}
    racks: dict[tuple[str, str], int] = {}
    node_names: list[str] = []
    node_rack: list[int] = []
    unit_node: list[int] = []
    unit_kind: list[int] = []
    unit_mem: list[float] = []
    pool_mem: list[float] = []
    for i, node in enumerate(nodes):
        if not node.get("Alive", node.get("alive", False)):
            continue
        resources = node.get("Resources") or {}
        zone = _site(node, zone_labels, "zone")
        rack_key = (zone, _site(node, rack_labels, "rack"))
        pods.setdefault(zone, len(pods))
        racks.setdefault(rack_key, len(racks))
        n = len(node_names)
        node_names.append(str(node.get("NodeID", f"node{i}")))
        node_rack.append(racks[rack_key])
        counts = []
        for code, kind in enumerate(kind_list):
            found = next((r for r in kinds[kind] if r in resources), None)
            counts.append((code, kind, int(resources[found]) if found else 0))
        total = sum(c for _, _, c in counts)
        shared = float(resources.get("memory", 0.0)) / total if total else 0.0
        for code, kind, count in counts:
            unit_node += [n] * count
            unit_kind += [code] * count
            unit_mem += [float(unit_memory[kind]) if unit_memory and kind in unit_memory else shared] * count
        pool_mem.append(float(resources.get("object_store_memory", 0.0)))
    rack_pod = [0] * len(racks)
    for (zone, _), r in racks.items():
        rack_pod[r] = pods[zone]
    out: dict[str, Any] = {
        "kinds": kind_list,
        "unit_kind_U": np.asarray(unit_kind, dtype=np.int16),
        "unit_flops_U": np.asarray([flops[kind_list[k]] for k in unit_kind], dtype=np.float64),
        "unit_memory_U": np.asarray(unit_mem, dtype=np.int64),
        "unit_node_U": np.asarray(unit_node, dtype=np.int64),
        "node_rack_N": np.asarray(node_rack, dtype=np.int64),
        "rack_pod_R": np.asarray(rack_pod, dtype=np.int64),
        "pool_node_P": np.arange(len(node_names), dtype=np.int64),
        "pool_memory_P": np.asarray(pool_mem, dtype=np.int64),
        "pool_bandwidth_P": np.full(len(node_names), float(pool_bandwidth)),
        "node_names": tuple(node_names),
        "rack_names": tuple(f"{zone}/{rack}" for zone, rack in racks),
        "pod_names": tuple(pods),
        "name": name,
    }
    if links is not None:
        out["links"] = links
    return out
