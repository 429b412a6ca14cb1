"""The cost model: what one training step moves and computes under a placement, and how long it takes.

Shape legend: L = MoE layers, E = experts per layer, X = all experts (flat id ``x = layer * E + expert``),
D = dense/router units, R = snapshot replicas per expert, Y = edges, U = units, P = memory pools.

**Traffic.** In every MoE layer each dense unit (router plus dense layers; tokens are split evenly over
the ``D`` dense units) sends expert ``x`` its token rows and receives the expert's outputs; backward sends
the output gradients and receives the input gradients. That is four transfers of
``rows_x / D * d_model * activation_bytes`` on the edge (dense unit, expert's unit), where
``rows_x = tokens_per_step * top_k * load_x``. After the step every expert copies its state (parameters
and optimizer moments) to each of its replicas' memory pools, amortised over ``snapshot_every`` steps.

**Compute.** Expert ``x`` costs ``2 * ffn_matrices * d_model * d_ff`` FLOPs per row forward and twice that
backward; a unit runs its experts one after another at its peak FLOP/s.

**Time.** Each unit has one port. The bytes it sends and receives serialise at each edge's tier bandwidth,
while latency is paid once per message round (four rounds a layer: dispatch, combine, output gradients,
input gradients) because messages to different peers overlap. A layer's experts run in parallel and
the combine waits for the slowest, so a layer takes the max over units of (expert compute + port time):
compute imbalance and a congested port both show up in that max. The step is::

    step = dense compute (max over dense units) + sum over layers of layer time + snapshot time

Snapshot time is the max over expert ports and pool writes of the amortised replica traffic. It is
counted as if nothing overlapped it, which makes the model conservative, never optimistic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from zetta_ray.checks import check, positive_int
from zetta_ray.errors import ConfigError
from zetta_ray.model_spec import ModelSpec
from zetta_ray.placement.topology import Tier, Topology

if TYPE_CHECKING:
    from zetta_ray.config import MoEConfig

__all__ = ["ROUNDS_PER_LAYER", "EdgeTable", "StepCost", "Workload", "step_cost", "zipf_load"]

ROUNDS_PER_LAYER = 4  # dispatch, combine, output gradients, input gradients
TOKENS, SNAPSHOT = 0, 1  # EdgeTable.kind_Y codes


def zipf_load(n_experts: int, exponent: float = 1.0, *, seed: int | None = None) -> np.ndarray:
    """Load shares ``~ 1 / rank**exponent`` summing to 1: a skewed router. Shuffled when ``seed`` is set."""
    if n_experts < 1 or exponent < 0:
        raise ConfigError(
            f"zipf_load(n_experts={n_experts}, exponent={exponent}): need n >= 1, exponent >= 0"
        )
    load_E = 1.0 / np.arange(1, n_experts + 1, dtype=np.float64) ** exponent
    if seed is not None:
        load_E = np.random.default_rng(seed).permutation(load_E)
    return load_E / load_E.sum()


@dataclass(kw_only=True, slots=True)
class Workload:
    """One training step of an MoE model, as the placer and the cost model see it.

    ``load`` gives each expert's share of its layer's routed rows, shape ``(E,)`` (every layer alike) or
    ``(L, E)``; each layer is normalised to sum to 1; None is uniform. ``expert_memory_bytes`` None derives
    an expert's resident bytes from its shape: parameters, gradients and optimizer moments, plus the
    activations backward keeps. ``dense_memory_bytes`` is what each dense unit must hold.
    """

    n_experts: int
    n_layers: int = 1
    top_k: int = 2
    d_model: int = 1024
    d_ff: int = 4096
    tokens_per_step: int = 8192
    load: Any = None
    capacity_factor: float | None = None
    n_dense: int = 1
    dense_flops_per_step: float = 0.0
    dense_memory_bytes: int = 0
    activation_bytes: int = 2
    param_bytes: int = 4
    optimizer_slots: int = 2
    ffn_matrices: int = 2
    replicas: int = 1
    snapshot_every: int = 1
    expert_memory_bytes: int | None = None

    def __post_init__(self) -> None:
        for name in ("n_experts", "n_layers", "top_k", "d_model", "d_ff", "tokens_per_step", "n_dense"):
            positive_int(f"Workload.{name}", getattr(self, name))
        for name in ("activation_bytes", "param_bytes", "ffn_matrices", "snapshot_every"):
            check(getattr(self, name) >= 1, f"Workload.{name}", getattr(self, name), "must be >= 1")
        for name in ("optimizer_slots", "replicas", "dense_memory_bytes", "dense_flops_per_step"):
            check(getattr(self, name) >= 0, f"Workload.{name}", getattr(self, name), "must be >= 0")
        if self.top_k > self.n_experts:
            raise ConfigError(f"Workload.top_k={self.top_k} must be <= n_experts ({self.n_experts})")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ConfigError(f"Workload.capacity_factor={self.capacity_factor!r} must be > 0, or None")
        if self.expert_memory_bytes is not None and self.expert_memory_bytes < 0:
            raise ConfigError(
                f"Workload.expert_memory_bytes={self.expert_memory_bytes} must be >= 0, or None"
            )
        if self.load is not None:
            load = np.asarray(self.load, dtype=np.float64)
            if load.shape not in ((self.n_experts,), (self.n_layers, self.n_experts)):
                raise ConfigError(
                    f"Workload.load has shape {load.shape}; give ({self.n_experts},) or "
                    f"({self.n_layers}, {self.n_experts}): one share per expert"
                )
            if (
                not np.all(np.isfinite(load))
                or load.min() < 0
                or np.any(load.reshape(-1, self.n_experts).sum(1) <= 0)
            ):
                raise ConfigError(
                    "Workload.load must be finite, >= 0, and have a positive sum in every layer"
                )
            self.load = load

    @classmethod
    def from_model(cls, model: ModelSpec, *, tokens_per_step: int, **overrides: Any) -> Workload:
        """The workload of ``model`` (the one conversion from the model description to the placer's):
        its MoE layers, expert shape and routing; ``overrides`` set any other field.

        The dense FLOPs estimate is ``6 * tokens * dense parameters`` (attention projections, dense
        MLPs, routers and LM head, forward and backward) plus the attention score matmuls; each dense
        unit holds those parameters with gradients and two moments (fp32) and one sequence of
        activations.
        """
        h = model.hidden
        dense_params = (
            model.layers * model.attention_params
            + model.dense_mlp_layers * model.mlp_params
            + model.moe_layers * h * model.n_experts
            + model.vocab * h
        )
        dense_flops = (
            6 * tokens_per_step * dense_params + 12 * model.layers * tokens_per_step * model.seq_len * h
        )
        values: dict[str, Any] = {
            "n_experts": model.n_experts,
            "n_layers": model.moe_layers,
            "top_k": model.top_k,
            "d_model": h,
            "d_ff": model.f,
            "ffn_matrices": model.mlp_matrices,
            "tokens_per_step": tokens_per_step,
            "capacity_factor": model.capacity_factor,
            "dense_flops_per_step": float(dense_flops),
            "dense_memory_bytes": 4 * 4 * (dense_params + model.seq_len * h),
            "activation_bytes": 4,
        }
        values.update(overrides)
        return cls(**values)

    @classmethod
    def from_moe_config(cls, cfg: MoEConfig, *, tokens_per_step: int, **overrides: Any) -> Workload:
        """The workload of ``zr.MoETransformer(cfg)``: ``from_model`` of ``ModelSpec.from_moe_config``."""
        return cls.from_model(ModelSpec.from_moe_config(cfg), tokens_per_step=tokens_per_step, **overrides)

    # -- derived per-expert figures (flat ids x = layer * n_experts + expert) --------------------------

    @property
    def total_experts(self) -> int:
        return self.n_layers * self.n_experts

    @property
    def load_LE(self) -> np.ndarray:
        load = np.ones(self.n_experts) if self.load is None else np.asarray(self.load, dtype=np.float64)
        load_LE = np.broadcast_to(load, (self.n_layers, self.n_experts))
        return load_LE / load_LE.sum(axis=1, keepdims=True)

    @property
    def rows_X(self) -> np.ndarray:
        """Token rows each expert processes per step (capped at capacity when a factor is set)."""
        rows_X = (self.tokens_per_step * self.top_k * self.load_LE).reshape(-1)
        if self.capacity_factor is not None:
            cap = math.ceil(self.capacity_factor * self.tokens_per_step * self.top_k / self.n_experts)
            rows_X = np.minimum(rows_X, cap)
        return rows_X

    @property
    def params_per_expert(self) -> int:
        return self.ffn_matrices * self.d_model * self.d_ff

    @property
    def flops_X(self) -> np.ndarray:
        """Forward plus backward FLOPs of each expert per step."""
        return self.rows_X * (6.0 * self.params_per_expert)

    @property
    def edge_bytes_X(self) -> np.ndarray:
        """Bytes per step on the edge between one dense unit and expert x: 4 transfers of its row share."""
        return ROUNDS_PER_LAYER * self.rows_X / self.n_dense * self.d_model * self.activation_bytes

    @property
    def snapshot_bytes(self) -> int:
        """Bytes of one expert's snapshot: parameters and optimizer moments."""
        return self.params_per_expert * self.param_bytes * (1 + self.optimizer_slots)

    @property
    def memory_X(self) -> np.ndarray:
        """Resident bytes of each expert on its unit."""
        if self.expert_memory_bytes is not None:
            return np.full(self.total_experts, float(self.expert_memory_bytes))
        state = self.params_per_expert * self.param_bytes * (2 + self.optimizer_slots)
        return state + self.rows_X * (2 * self.d_model + 2 * self.d_ff) * self.activation_bytes

    def expert_id(self, x: int) -> tuple[int, int]:
        """``(layer, expert)`` of flat id ``x``."""
        return divmod(int(x), self.n_experts)


@dataclass(kw_only=True, slots=True, frozen=True)
class EdgeTable:
    """Every edge that carries bytes in one step, as parallel arrays.

    ``kind_Y`` is 0 for token rows (``src_Y`` a dense unit, ``dst_Y`` the expert's unit; both directions,
    forward and backward) and 1 for snapshot replication (``src_Y`` the expert's unit, ``dst_Y`` a pool
    id; amortised per step). ``seconds_Y`` is bytes over the tier bandwidth (latency not included).
    """

    kind_Y: np.ndarray
    expert_Y: np.ndarray
    src_Y: np.ndarray
    dst_Y: np.ndarray
    tier_Y: np.ndarray
    bytes_Y: np.ndarray
    seconds_Y: np.ndarray

    def bytes_by_tier(self) -> dict[str, float]:
        """Total bytes per step on each tier, e.g. ``{"RACK": 1.2e9, ...}``: where the traffic goes."""
        sums = np.bincount(self.tier_Y, weights=self.bytes_Y, minlength=len(Tier))
        return {t.name: float(sums[t]) for t in Tier if sums[t] > 0}

    def expert_bytes(self, n_total: int, kind: int) -> np.ndarray:
        """Bytes per step of each expert on edges of ``kind`` (``TOKENS`` or ``SNAPSHOT``), shape (X,)."""
        mine = self.kind_Y == kind
        return np.bincount(self.expert_Y[mine], weights=self.bytes_Y[mine], minlength=n_total)


@dataclass(kw_only=True, slots=True, frozen=True)
class StepCost:
    """The predicted step time of a placement and what makes it up (seconds)."""

    step_time_s: float
    dense_compute_s: float
    layer_time_s_L: np.ndarray
    snapshot_s: float
    expert_compute_s_X: np.ndarray
    layer_bottleneck_unit_L: np.ndarray
    edges: EdgeTable

    def to_dict(self) -> dict[str, Any]:
        return {
            "step_time_s": self.step_time_s,
            "dense_compute_s": self.dense_compute_s,
            "layer_time_s": [float(t) for t in self.layer_time_s_L],
            "snapshot_s": self.snapshot_s,
            "max_expert_compute_s": float(self.expert_compute_s_X.max(initial=0.0)),
            "bottleneck_units": [int(u) for u in self.layer_bottleneck_unit_L],
            "bytes_by_tier": self.edges.bytes_by_tier(),
        }


def _port_times(keys: np.ndarray, seconds: np.ndarray, latency: np.ndarray, rounds: int) -> tuple:
    """Per distinct key: sum of seconds plus ``rounds`` times the max latency (one port's busy time)."""
    uniq, inv = np.unique(keys, return_inverse=True)
    busy = np.bincount(inv, weights=seconds, minlength=len(uniq))
    lat = np.zeros(len(uniq))
    np.maximum.at(lat, inv, latency)
    return uniq, inv, busy + rounds * lat


def step_cost(
    topology: Topology,
    workload: Workload,
    *,
    expert_unit_X: np.ndarray,
    dense_unit_D: np.ndarray,
    replica_pool_XR: np.ndarray | None = None,
) -> StepCost:
    """Evaluate a placement under the model in this module's docstring. Pure; O(D * X) numpy work."""
    t, w = topology, workload
    expert_unit_X = np.asarray(expert_unit_X, dtype=np.int64)
    dense_unit_D = np.asarray(dense_unit_D, dtype=np.int64)
    n_x, n_d, n_u = w.total_experts, len(dense_unit_D), t.n_units
    if expert_unit_X.shape != (n_x,) or n_d != w.n_dense:
        raise ConfigError(
            f"placement shape mismatch: {expert_unit_X.shape} expert units for {n_x} experts and {n_d} dense "
            f"units for n_dense={w.n_dense}"
        )
    bw_T, lat_T = t.links.bandwidth_T, t.links.latency_T
    dense_s = float(np.max(w.dense_flops_per_step / n_d / t.unit_flops_U[dense_unit_D]))

    # Token edges, expert-major: edge y = x * D + d.
    src_Y = np.tile(dense_unit_D, n_x)
    dst_Y = np.repeat(expert_unit_X, n_d)
    expert_Y = np.repeat(np.arange(n_x), n_d)
    tier_Y = t.unit_tier(src_Y, dst_Y)
    bytes_Y = np.repeat(w.edge_bytes_X, n_d)
    secs_Y = bytes_Y / bw_T[tier_Y]
    compute_X = w.flops_X / t.unit_flops_U[expert_unit_X]

    # Per (layer, unit): expert compute + port time, where an edge occupies the ports at both ends.
    layer_Y = expert_Y // w.n_experts
    ends = np.concatenate([layer_Y * n_u + src_Y, layer_Y * n_u + dst_Y])
    keys = np.concatenate([ends, np.arange(n_x) // w.n_experts * n_u + expert_unit_X])
    seconds = np.concatenate([secs_Y, secs_Y, compute_X])
    latency = np.concatenate([lat_T[tier_Y], lat_T[tier_Y], np.zeros(n_x)])
    uniq, _, time = _port_times(keys, seconds, latency, ROUNDS_PER_LAYER)
    layer_time_L = np.zeros(w.n_layers)
    np.maximum.at(layer_time_L, uniq // n_u, time)
    bottleneck_L = np.full(w.n_layers, -1, dtype=np.int64)
    for layer in range(w.n_layers):
        mine = np.flatnonzero(uniq // n_u == layer)
        bottleneck_L[layer] = uniq[mine[np.argmax(time[mine])]] % n_u

    # Snapshot edges: expert unit -> replica pool, amortised over snapshot_every steps.
    snap_s = 0.0
    parts = [(np.full(n_x * n_d, TOKENS, np.int8), expert_Y, src_Y, dst_Y, tier_Y, bytes_Y, secs_Y)]
    if replica_pool_XR is not None and w.replicas > 0:
        pool_XR = np.asarray(replica_pool_XR, dtype=np.int64).reshape(n_x, -1)
        s_x = np.repeat(np.arange(n_x), pool_XR.shape[1])
        s_src, s_dst = expert_unit_X[s_x], pool_XR.reshape(-1)
        s_tier = t.pool_tier(s_src, s_dst)
        s_bytes = np.full(len(s_x), w.snapshot_bytes / w.snapshot_every)
        s_secs = s_bytes / bw_T[s_tier]
        _, _, unit_time = _port_times(s_src, s_secs, lat_T[s_tier], 1)
        pool_time = np.bincount(s_dst, weights=s_bytes / t.pool_bandwidth_P[s_dst])
        snap_s = float(max(unit_time.max(initial=0.0), pool_time.max(initial=0.0)))
        parts.append((np.full(len(s_x), SNAPSHOT, np.int8), s_x, s_src, s_dst, s_tier, s_bytes, s_secs))
    names = ("kind_Y", "expert_Y", "src_Y", "dst_Y", "tier_Y", "bytes_Y", "seconds_Y")
    edges = EdgeTable(
        **{n: np.concatenate(cols) for n, cols in zip(names, zip(*parts, strict=True), strict=True)}
    )
    return StepCost(
        step_time_s=dense_s + float(layer_time_L.sum()) + snap_s,
        dense_compute_s=dense_s,
        layer_time_s_L=layer_time_L,
        snapshot_s=snap_s,
        expert_compute_s_X=compute_X,
        layer_bottleneck_unit_L=bottleneck_L,
        edges=edges,
    )
