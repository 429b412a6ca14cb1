"""The machine as the placer sees it: compute units, memory pools and the links between them.

Shape legend (array-name suffixes): U = compute units, N = nodes, R = racks, P = memory pools, T = tiers.

**Units and pools.** A compute unit has a kind (``"npu"``, ``"gpu"``, ``"cpu"``, ...), a peak FLOP/s and
its own memory (HBM for an accelerator). A memory pool is memory that is not a unit's (host DRAM, a
CXL-attached pool) with a capacity and a write bandwidth; snapshot replicas of expert state go there.

**Failure domains.** Every unit and pool lives in a node, every node in a rack, every rack in a pod. A
node failure takes its units and pools with it; a rack failure (power, top-of-rack switch) takes the
rack. The placer keeps an expert's snapshot replica out of the expert's node, and out of its rack when
the pools span more than one rack.

**Links.** There is no N^2 link matrix (a million units would need 8 TB for one). Two endpoints talk over
the link of the *tier* of their lowest common failure domain: the same unit (free), the same node, the
same rack, the same pod, or the fabric between pods. ``LinkTiers`` gives each tier a bandwidth (one
unit's share, bytes/s) and a latency (seconds per message). So the cost of any edge is two array lookups,
and everything vectorises over units.

**Storage.** Struct-of-arrays (one numpy array per attribute, indexed by unit, node, rack or pool id), so
a million-unit machine is a few tens of MB and a whole-machine query is one numpy expression. The arrays
are read-only; build a new ``Topology`` to change the machine.

Build one with ``Topology.from_spec`` / ``from_file`` (synthetic machines, see ``placement.spec``) or
``Topology.from_ray_nodes`` (the live cluster, from ``ray.nodes()``; see ``placement.ray_nodes``).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any

import numpy as np

from zetta_ray.errors import ConfigError
from zetta_ray.placement.ray_nodes import ray_node_fields
from zetta_ray.placement.spec import expand, parse_quantity

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["Link", "LinkTiers", "Tier", "Topology"]


class Tier(IntEnum):
    """How far apart two endpoints are: the level of their lowest common failure domain."""

    UNIT = 0
    NODE = 1
    RACK = 2
    POD = 3
    FABRIC = 4


@dataclass(kw_only=True, slots=True, frozen=True)
class Link:
    """One tier's link: ``bandwidth`` in bytes/s (one unit's share) and ``latency`` in s per message."""

    bandwidth: float
    latency: float

    def __post_init__(self) -> None:
        if not self.bandwidth > 0 or not self.latency >= 0:
            raise ConfigError(
                f"Link(bandwidth={self.bandwidth!r}, latency={self.latency!r}) is invalid: bandwidth must "
                "be > 0 bytes/s and latency >= 0 s"
            )


@dataclass(kw_only=True, slots=True, frozen=True)
class LinkTiers:
    """Bandwidth and latency per tier. The defaults are a rough GPU cluster of the mid-2020s:
    NVLink-class inside a node, a 200 Gb/s NIC to the rack, oversubscribed above."""

    node: Link = Link(bandwidth=100e9, latency=2e-6)
    rack: Link = Link(bandwidth=25e9, latency=5e-6)
    pod: Link = Link(bandwidth=12.5e9, latency=10e-6)
    fabric: Link = Link(bandwidth=6.25e9, latency=20e-6)

    @property
    def bandwidth_T(self) -> np.ndarray:
        """Bytes/s indexed by ``Tier`` (``inf`` for ``Tier.UNIT``: nothing moves)."""
        return np.array(
            [np.inf, self.node.bandwidth, self.rack.bandwidth, self.pod.bandwidth, self.fabric.bandwidth]
        )

    @property
    def latency_T(self) -> np.ndarray:
        """Seconds per message indexed by ``Tier`` (0 for ``Tier.UNIT``)."""
        return np.array([0.0, self.node.latency, self.rack.latency, self.pod.latency, self.fabric.latency])

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> LinkTiers:
        """From ``{"rack": {"bandwidth": "25GB/s", "latency": "5us"}, ...}``; missing tiers keep defaults."""
        tiers = ("node", "rack", "pod", "fabric")
        unknown = sorted(set(spec) - set(tiers))
        if unknown:
            raise ConfigError(f"unknown tier(s) {unknown} in [links]; tiers are {list(tiers)}")
        default = cls()
        out = {}
        for tier in tiers:
            entry = spec.get(tier, {})
            if set(entry) - {"bandwidth", "latency"}:
                raise ConfigError(f"[links.{tier}] takes bandwidth and latency, got {sorted(entry)}")
            link = getattr(default, tier)
            out[tier] = Link(
                bandwidth=parse_quantity(
                    entry.get("bandwidth", link.bandwidth), unit="B/s", where=f"links.{tier}"
                ),
                latency=parse_quantity(entry.get("latency", link.latency), unit="s", where=f"links.{tier}"),
            )
        return cls(**out)


def _frozen(a: Any, dtype: type) -> np.ndarray:
    out = np.array(a, dtype=dtype, copy=True).reshape(-1)
    out.flags.writeable = False
    return out


@dataclass(kw_only=True, slots=True, eq=False)
class Topology:
    """Compute units, memory pools and failure domains of one machine, as read-only numpy arrays.

    Indices are dense ints: unit ``u`` is in node ``unit_node_U[u]``, which is in rack ``node_rack_N[n]``,
    which is in pod ``rack_pod_R[r]``. ``unit_kind_U`` holds codes into ``kinds``. Memory is in bytes,
    compute in FLOP/s, bandwidth in bytes/s. ``node_names`` (Ray node ids for a live cluster) may be None,
    in which case names are made up from the rack name and the node index.
    """

    kinds: tuple[str, ...]
    unit_kind_U: np.ndarray
    unit_flops_U: np.ndarray
    unit_memory_U: np.ndarray
    unit_node_U: np.ndarray
    node_rack_N: np.ndarray
    rack_pod_R: np.ndarray
    pool_node_P: np.ndarray
    pool_memory_P: np.ndarray
    pool_bandwidth_P: np.ndarray
    links: LinkTiers = field(default_factory=LinkTiers)
    node_names: tuple[str, ...] | None = None
    rack_names: tuple[str, ...] | None = None
    pod_names: tuple[str, ...] | None = None
    name: str = "topology"
    # Derived in __post_init__.
    unit_rack_U: np.ndarray = field(init=False, repr=False)
    unit_pod_U: np.ndarray = field(init=False, repr=False)
    unit_slot_U: np.ndarray = field(init=False, repr=False)
    pool_rack_P: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.unit_kind_U = _frozen(self.unit_kind_U, np.int16)
        self.unit_flops_U = _frozen(self.unit_flops_U, np.float64)
        self.unit_memory_U = _frozen(self.unit_memory_U, np.int64)
        self.unit_node_U = _frozen(self.unit_node_U, np.int64)
        self.node_rack_N = _frozen(self.node_rack_N, np.int64)
        self.rack_pod_R = _frozen(self.rack_pod_R, np.int64)
        self.pool_node_P = _frozen(self.pool_node_P, np.int64)
        self.pool_memory_P = _frozen(self.pool_memory_P, np.int64)
        self.pool_bandwidth_P = _frozen(self.pool_bandwidth_P, np.float64)
        self.kinds = tuple(str(k) for k in self.kinds)
        self._validate()
        self.unit_rack_U = _frozen(self.node_rack_N[self.unit_node_U], np.int64)
        self.unit_pod_U = _frozen(self.rack_pod_R[self.unit_rack_U], np.int64)
        self.pool_rack_P = _frozen(self.node_rack_N[self.pool_node_P], np.int64)
        # unit_slot_U: the unit's index among the units of its kind on its node (npu 0..3 of a node).
        order = np.lexsort((np.arange(self.n_units), self.unit_kind_U, self.unit_node_U))
        key = self.unit_node_U[order] * (len(self.kinds) + 1) + self.unit_kind_U[order]
        start = np.flatnonzero(np.r_[True, key[1:] != key[:-1]]) if len(key) else np.zeros(0, np.int64)
        first = np.repeat(start, np.diff(np.r_[start, len(key)]))
        slot = np.empty(self.n_units, dtype=np.int64)
        slot[order] = np.arange(self.n_units) - first
        self.unit_slot_U = _frozen(slot, np.int64)

    def _validate(self) -> None:
        n_u, n_p = len(self.unit_kind_U), len(self.pool_node_P)
        for arr, n, label in (
            (self.unit_flops_U, n_u, "unit_flops_U"),
            (self.unit_memory_U, n_u, "unit_memory_U"),
            (self.unit_node_U, n_u, "unit_node_U"),
            (self.pool_memory_P, n_p, "pool_memory_P"),
            (self.pool_bandwidth_P, n_p, "pool_bandwidth_P"),
        ):
            if len(arr) != n:
                raise ConfigError(
                    f"Topology.{label} has {len(arr)} entries, expected {n} (one per unit/pool)"
                )
        checks = (
            (self.unit_kind_U, len(self.kinds), "unit_kind_U", "kinds"),
            (self.unit_node_U, self.n_nodes, "unit_node_U", "node_rack_N"),
            (self.pool_node_P, self.n_nodes, "pool_node_P", "node_rack_N"),
            (self.node_rack_N, self.n_racks, "node_rack_N", "rack_pod_R"),
        )
        for arr, bound, label, table in checks:
            if len(arr) and (arr.min() < 0 or arr.max() >= bound):
                raise ConfigError(f"Topology.{label} holds ids outside [0, {bound}) (the length of {table})")
        if len(set(self.kinds)) != len(self.kinds):
            raise ConfigError(f"Topology.kinds={self.kinds} repeats a kind; list each kind once")
        if n_u and (not np.all(self.unit_flops_U > 0) or self.unit_memory_U.min() < 0):
            raise ConfigError("Topology: every unit needs flops > 0 and memory >= 0")
        if n_p and (not np.all(self.pool_bandwidth_P > 0) or self.pool_memory_P.min() < 0):
            raise ConfigError("Topology: every memory pool needs bandwidth > 0 and memory >= 0")
        for names, n, label in (
            (self.node_names, self.n_nodes, "node_names"),
            (self.rack_names, self.n_racks, "rack_names"),
            (self.pod_names, self.n_pods, "pod_names"),
        ):
            if names is not None and len(names) != n:
                raise ConfigError(f"Topology.{label} has {len(names)} names for {n} entries")

    # -- sizes ----------------------------------------------------------------------------------------

    @property
    def n_units(self) -> int:
        return len(self.unit_kind_U)

    @property
    def n_nodes(self) -> int:
        return len(self.node_rack_N)

    @property
    def n_racks(self) -> int:
        return len(self.rack_pod_R)

    @property
    def n_pods(self) -> int:
        if self.pod_names is not None:
            return len(self.pod_names)
        return int(self.rack_pod_R.max()) + 1 if self.n_racks else 0

    @property
    def n_pools(self) -> int:
        return len(self.pool_node_P)

    # -- tiers ----------------------------------------------------------------------------------------

    def node_tier(self, a_node: Any, b_node: Any) -> np.ndarray:
        """``Tier`` codes between nodes (NODE when equal); broadcasts like numpy."""
        a, b = np.asarray(a_node), np.asarray(b_node)
        rack_a, rack_b = self.node_rack_N[a], self.node_rack_N[b]
        pod_same = self.rack_pod_R[rack_a] == self.rack_pod_R[rack_b]
        return np.where(
            a == b,
            Tier.NODE,
            np.where(rack_a == rack_b, Tier.RACK, np.where(pod_same, Tier.POD, Tier.FABRIC)),
        ).astype(np.int8)

    def unit_tier(self, a_unit: Any, b_unit: Any) -> np.ndarray:
        """``Tier`` codes between units (UNIT when equal); broadcasts like numpy."""
        a, b = np.asarray(a_unit), np.asarray(b_unit)
        return np.where(a == b, Tier.UNIT, self.node_tier(self.unit_node_U[a], self.unit_node_U[b])).astype(
            np.int8
        )

    def pool_tier(self, unit: Any, pool: Any) -> np.ndarray:
        """``Tier`` codes from units to memory pools (a pool on the unit's own node is NODE)."""
        return self.node_tier(self.unit_node_U[np.asarray(unit)], self.pool_node_P[np.asarray(pool)])

    # -- lookups --------------------------------------------------------------------------------------

    def kind_code(self, kind: str) -> int | None:
        return self.kinds.index(kind) if kind in self.kinds else None

    def units_of_kind(self, kind: str) -> np.ndarray:
        """Unit ids of ``kind`` in ascending order (empty if the machine has none)."""
        code = self.kind_code(kind)
        return np.zeros(0, np.int64) if code is None else np.flatnonzero(self.unit_kind_U == code)

    def node_name(self, node: int) -> str:
        if self.node_names is not None:
            return self.node_names[node]
        return f"{self.rack_name(int(self.node_rack_N[node]))}.n{node}"

    def rack_name(self, rack: int) -> str:
        return self.rack_names[rack] if self.rack_names is not None else f"rack{rack}"

    def pod_name(self, pod: int) -> str:
        return self.pod_names[pod] if self.pod_names is not None else f"pod{pod}"

    def unit_info(self, unit: int) -> dict[str, Any]:
        """One unit as plain data: id, kind, slot on its node, node/rack/pod names, flops, memory."""
        node = int(self.unit_node_U[unit])
        return {
            "unit": int(unit),
            "kind": self.kinds[self.unit_kind_U[unit]],
            "slot": int(self.unit_slot_U[unit]),
            "node": self.node_name(node),
            "rack": self.rack_name(int(self.unit_rack_U[unit])),
            "pod": self.pod_name(int(self.unit_pod_U[unit])),
            "flops": float(self.unit_flops_U[unit]),
            "memory_bytes": int(self.unit_memory_U[unit]),
        }

    def summary(self) -> dict[str, Any]:
        """Counts and totals, JSON-ready: what a CLI prints before a plan."""
        kinds = {}
        for code, kind in enumerate(self.kinds):
            mine = self.unit_kind_U == code
            kinds[kind] = {
                "units": int(mine.sum()),
                "flops": float(self.unit_flops_U[mine].sum()),
                "memory_bytes": int(self.unit_memory_U[mine].sum()),
            }
        return {
            "name": self.name,
            "units": self.n_units,
            "nodes": self.n_nodes,
            "racks": self.n_racks,
            "pods": self.n_pods,
            "pools": self.n_pools,
            "pool_memory_bytes": int(self.pool_memory_P.sum()),
            "kinds": kinds,
        }

    # -- constructors ---------------------------------------------------------------------------------

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> Topology:
        """A synthetic machine from a nested spec (see ``zetta_ray.placement.spec`` for the format)."""
        allowed = {"name", "links", "node_types", "pods", "racks", "nodes"}
        unknown = sorted(set(spec) - allowed)
        if unknown:
            raise ConfigError(f"unknown key(s) {unknown} in the topology spec; allowed: {sorted(allowed)}")
        name = str(spec.get("name", "synthetic"))
        return cls(**expand(spec), links=LinkTiers.from_spec(spec.get("links", {})), name=name)

    @classmethod
    def from_file(cls, path: str | Path) -> Topology:
        """A synthetic machine from a ``.toml`` or ``.json`` spec file."""
        path = Path(path)
        if path.suffix not in (".toml", ".json"):
            raise ConfigError(f"topology file {str(path)!r} must end in .toml or .json")
        try:
            text = path.read_text()
        except OSError as e:
            raise ConfigError(f"cannot read topology file {str(path)!r}: {e}") from e
        try:
            spec = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(
                f"topology file {str(path)!r} is not valid {path.suffix[1:].upper()}: {e}"
            ) from e
        spec.setdefault("name", path.stem)
        return cls.from_spec(spec)

    @classmethod
    def from_ray_nodes(cls, nodes: list[dict[str, Any]], **options: Any) -> Topology:
        """The live cluster from ``ray.nodes()`` entries (plain dicts, so no Ray is needed to test it).

        Each alive node becomes a node; its resources declare units (``{"npu": 4, "GPU": 2, "CPU": 8}``)
        and its ``object_store_memory`` one memory pool; labels (``rack``, ``ray.io/availability-zone``)
        or resources (``rack:<name>``, ``zone:<name>``) place it in a rack and a pod. Keyword options and
        defaults: ``zetta_ray.placement.ray_nodes.ray_node_fields``.
        """
        return cls(**ray_node_fields(nodes, **options))
