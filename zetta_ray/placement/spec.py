"""Synthetic machine specs: a compact, nested description that expands to millions of units.

A spec is a mapping (read from TOML or JSON). Failure domains nest ``pods > racks > nodes``, and every
level takes a ``count`` so a large machine is a few lines::

    name = "two-pod"
    [links]                                  # optional; per tier, see ``LinkTiers``
    rack = { bandwidth = "25GB/s", latency = "5us" }

    [node_types.npu8]                        # optional named node templates
    units = [{ kind = "npu", count = 8, flops = "400T", memory = "64GiB" }]
    pools = [{ memory = "1TiB", bandwidth = "100GB/s" }]

    [[pods]]
    count = 2
    racks = [{ count = 16, nodes = [{ type = "npu8", count = 32 }] }]

``pods`` may be left out (one pod holding ``racks``), and so may ``racks`` (one rack holding ``nodes``).
A node entry either names a ``type`` or lists its own ``units`` and ``pools``. Quantities are numbers in
base units (bytes, bytes/s, FLOP/s, seconds) or strings with a prefix and an optional unit:
``"64GiB"``, ``"400T"``, ``"400TFLOP/s"``, ``"25GB/s"``, ``"5us"``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from zetta_ray.errors import ConfigError

__all__ = ["parse_quantity"]

_PREFIX = {
    "": 1.0,
    "n": 1e-9,
    "u": 1e-6,
    "µ": 1e-6,
    "m": 1e-3,
    "k": 1e3,
    "K": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "P": 1e15,
    "E": 1e18,
    "Ki": 2.0**10,
    "Mi": 2.0**20,
    "Gi": 2.0**30,
    "Ti": 2.0**40,
    "Pi": 2.0**50,
}
_UNIT_ALIASES = {"B": "B", "B/s": "B/s", "FLOP/s": "FLOP/s", "FLOPS": "FLOP/s", "s": "s"}
_QUANTITY = re.compile(
    r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([numµkKMGTPE]i?)?\s*(B/s|B|FLOP/s|FLOPS|s)?\s*$"
)


def parse_quantity(value: Any, *, unit: str, where: str) -> float:
    """A number, or a string such as ``"64GiB"`` / ``"25GB/s"`` / ``"5us"``, in base ``unit``.

    ``unit`` is one of ``"B"``, ``"B/s"``, ``"FLOP/s"`` and ``"s"``; a string that names another unit is
    rejected so that a bandwidth typed where a size belongs does not pass silently.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    match = _QUANTITY.match(value) if isinstance(value, str) else None
    if match is None or (match.group(2) or "") not in _PREFIX:
        raise ConfigError(
            f"{where}={value!r} is not a quantity in {unit}; write a number in {unit} or a string such as "
            f"'64GiB', '25GB/s', '400TFLOP/s' or '5us'"
        )
    given = _UNIT_ALIASES.get(match.group(3) or "", unit)
    if given != unit:
        raise ConfigError(f"{where}={value!r} is in {given} but must be in {unit}")
    return float(match.group(1)) * _PREFIX[match.group(2) or ""]


def _count(entry: Mapping[str, Any], where: str) -> int:
    n = entry.get("count", 1)
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ConfigError(f"{where}.count={n!r} is invalid: must be an integer >= 0")
    return n


def _check_keys(entry: Any, allowed: set[str], where: str) -> Mapping[str, Any]:
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{where} must be a table (a mapping), got {type(entry).__name__}")
    unknown = sorted(set(entry) - allowed)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {where}; allowed: {sorted(allowed)}")
    return entry


def _list(entry: Mapping[str, Any], key: str, where: str) -> Sequence[Any]:
    items = entry.get(key, [])
    if not isinstance(items, Sequence) or isinstance(items, str):
        raise ConfigError(f"{where}.{key} must be a list of tables, got {type(items).__name__}")
    return items


@dataclass(frozen=True, slots=True)
class _NodeTemplate:
    """The units and pools of one kind of node, as flat per-node arrays (k = units, q = pools)."""

    kind_k: tuple[str, ...]
    flops_k: np.ndarray
    memory_k: np.ndarray
    pool_memory_q: np.ndarray
    pool_bandwidth_q: np.ndarray


def _node_template(entry: Any, where: str) -> _NodeTemplate:
    entry = _check_keys(entry, {"units", "pools", "count", "name"}, where)
    kinds: list[str] = []
    flops: list[float] = []
    memory: list[float] = []
    for i, unit in enumerate(_list(entry, "units", where)):
        w = f"{where}.units[{i}]"
        unit = _check_keys(unit, {"kind", "count", "flops", "memory"}, w)
        kind = unit.get("kind")
        if not isinstance(kind, str) or not kind:
            raise ConfigError(f"{w}.kind={kind!r} is invalid: name the unit kind, e.g. 'npu', 'gpu' or 'cpu'")
        n = _count(unit, w)
        f = parse_quantity(unit.get("flops"), unit="FLOP/s", where=f"{w}.flops")
        m = parse_quantity(unit.get("memory"), unit="B", where=f"{w}.memory")
        if f <= 0 or m < 0:
            raise ConfigError(f"{w}: flops ({f:g}) must be > 0 and memory ({m:g}) >= 0")
        kinds += [kind] * n
        flops += [f] * n
        memory += [m] * n
    pool_memory: list[float] = []
    pool_bandwidth: list[float] = []
    for i, pool in enumerate(_list(entry, "pools", where)):
        w = f"{where}.pools[{i}]"
        pool = _check_keys(pool, {"count", "memory", "bandwidth"}, w)
        m = parse_quantity(pool.get("memory"), unit="B", where=f"{w}.memory")
        bw = parse_quantity(pool.get("bandwidth", 50e9), unit="B/s", where=f"{w}.bandwidth")
        if m < 0 or bw <= 0:
            raise ConfigError(f"{w}: memory ({m:g}) must be >= 0 and bandwidth ({bw:g}) > 0")
        n = _count(pool, w)
        pool_memory += [m] * n
        pool_bandwidth += [bw] * n
    return _NodeTemplate(
        kind_k=tuple(kinds),
        flops_k=np.asarray(flops, dtype=np.float64),
        memory_k=np.asarray(memory, dtype=np.int64),
        pool_memory_q=np.asarray(pool_memory, dtype=np.int64),
        pool_bandwidth_q=np.asarray(pool_bandwidth, dtype=np.float64),
    )


def _named(entry: Mapping[str, Any], default: str, i: int, count: int) -> str:
    if "name" not in entry:
        return default
    return f"{entry['name']}{i}" if count > 1 else str(entry["name"])


def expand(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Expand the nested ``pods > racks > nodes`` counts into flat arrays (units ordered by node):
    keyword arguments for ``Topology`` (all but ``links`` and ``name``)."""
    types = _check_keys(spec.get("node_types", {}), set(spec.get("node_types", {})), "node_types")
    templates: dict[str, _NodeTemplate] = {n: _node_template(t, f"node_types.{n}") for n, t in types.items()}
    if "pods" in spec:
        pods = _list(spec, "pods", "spec")
    elif "racks" in spec:
        pods = [{"racks": spec["racks"]}]
    else:
        pods = [{"racks": [{"nodes": spec.get("nodes", [])}]}]

    rack_pod: list[int] = []
    rack_names: list[str] = []
    pod_names: list[str] = []
    block_template: list[_NodeTemplate] = []
    block_rack: list[int] = []
    block_count: list[int] = []
    for i, pod in enumerate(pods):
        pw = f"pods[{i}]"
        pod = _check_keys(pod, {"count", "name", "racks"}, pw)
        racks = _list(pod, "racks", pw)
        # Resolve each node entry once per spec entry, not once per repetition.
        resolved = []
        for j, rack in enumerate(racks):
            rw = f"{pw}.racks[{j}]"
            rack = _check_keys(rack, {"count", "name", "nodes"}, rw)
            nodes = []
            for k, node in enumerate(_list(rack, "nodes", rw)):
                nw = f"{rw}.nodes[{k}]"
                node = _check_keys(node, {"count", "name", "type", "units", "pools"}, nw)
                if "type" in node:
                    if set(node) - {"count", "name", "type"}:
                        raise ConfigError(
                            f"{nw} names type={node['type']!r}; give units/pools there, not here"
                        )
                    if node["type"] not in templates:
                        raise ConfigError(
                            f"{nw}.type={node['type']!r} is not defined; [node_types] has {sorted(templates)}"
                        )
                    nodes.append((templates[node["type"]], _count(node, nw)))
                else:
                    nodes.append((_node_template(node, nw), _count(node, nw)))
            resolved.append((rack, _count(rack, rw), nodes))
        n_pods = _count(pod, pw)
        for p in range(n_pods):
            pod_id = len(pod_names)
            pod_names.append(_named(pod, f"pod{pod_id}", p, n_pods))
            local = 0
            for rack, n_racks, nodes in resolved:
                for r in range(n_racks):
                    rack_id = len(rack_pod)
                    rack_pod.append(pod_id)
                    rack_names.append(f"{pod_names[-1]}.{_named(rack, f'rack{local}', r, n_racks)}")
                    local += 1
                    for template, n_nodes in nodes:
                        block_template.append(template)
                        block_rack.append(rack_id)
                        block_count.append(n_nodes)

    counts = np.asarray(block_count, dtype=np.int64)
    node_rack_N = np.repeat(np.asarray(block_rack, dtype=np.int64), counts)
    first_node = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    kinds = tuple(sorted({k for t in block_template for k in t.kind_k}))
    code = {k: i for i, k in enumerate(kinds)}
    units: dict[str, list[np.ndarray]] = {"node": [], "kind": [], "flops": [], "memory": []}
    pools: dict[str, list[np.ndarray]] = {"node": [], "memory": [], "bandwidth": []}
    for template in {id(t): t for t in block_template}.values():
        mine = np.asarray([t is template for t in block_template])
        nodes_n = np.concatenate(
            [np.arange(f, f + c) for f, c in zip(first_node[mine], counts[mine], strict=True)]
        )
        k, q = len(template.kind_k), len(template.pool_memory_q)
        units["node"].append(np.repeat(nodes_n, k))
        units["kind"].append(
            np.tile(np.asarray([code[x] for x in template.kind_k], dtype=np.int16), len(nodes_n))
        )
        units["flops"].append(np.tile(template.flops_k, len(nodes_n)))
        units["memory"].append(np.tile(template.memory_k, len(nodes_n)))
        pools["node"].append(np.repeat(nodes_n, q))
        pools["memory"].append(np.tile(template.pool_memory_q, len(nodes_n)))
        pools["bandwidth"].append(np.tile(template.pool_bandwidth_q, len(nodes_n)))

    def cat(parts: list[np.ndarray], dtype: type) -> np.ndarray:
        return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype=dtype)

    u_node = cat(units["node"], np.int64)
    u_order = np.argsort(u_node, kind="stable")
    p_node = cat(pools["node"], np.int64)
    p_order = np.argsort(p_node, kind="stable")
    return {
        "kinds": kinds,
        "unit_kind_U": cat(units["kind"], np.int16)[u_order],
        "unit_flops_U": cat(units["flops"], np.float64)[u_order],
        "unit_memory_U": cat(units["memory"], np.int64)[u_order],
        "unit_node_U": u_node[u_order],
        "node_rack_N": node_rack_N,
        "rack_pod_R": np.asarray(rack_pod, dtype=np.int64),
        "pool_node_P": p_node[p_order],
        "pool_memory_P": cat(pools["memory"], np.int64)[p_order],
        "pool_bandwidth_P": cat(pools["bandwidth"], np.float64)[p_order],
        "rack_names": tuple(rack_names),
        "pod_names": tuple(pod_names),
    }
