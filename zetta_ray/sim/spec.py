"""The simulator's spec file (TOML) and its validated dataclasses. Format in ``docs/simulator.md``.

    [model]        kind, layers, hidden, heads, seq_len, vocab, ffn_hidden?, n_experts, top_k, moe_every,
                   kv_heads?, gated_mlp?, flash_attention?, capacity_factor?, expert_imbalance?
    [hardware]     preset = "dgx-a100-80gb" | "dgx-h100-80gb" (or unit = {...} and tiers = [...]), units,
                   precision?, optical_circuits?, core_oversubscription?, storage_bandwidth_gb_s?,
                   memory_pool_gb_per_unit?, memory_pool_bandwidth_gb_s?
    [parallel]     tp, pp, dp, ep, virtual_stages, micro_batch, global_batch, recompute, sequence_parallel,
                   zero1?, overlap_comm?            -- or, before any table: parallel = "auto"
    [search]       with "auto": global_batch?, min_utilization?, overlap_comm?
    [failures]     unit_mtbf_hours, node_mtbf_hours?, link_mtbf_hours?, restart_s?, detect_s?, swap_s?,
                   snapshot_every?

Every unknown key is an error that lists the keys allowed where it stands.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from zetta_ray.errors import DoesNotFitError, SpecError
from zetta_ray.model_spec import ModelSpec
from zetta_ray.sim.calibration import CALIBRATED, Efficiency
from zetta_ray.sim.failures import FailureSpec
from zetta_ray.sim.hardware import Hardware, TierFigures, UnitFigures, preset, with_core_taper
from zetta_ray.sim.memory import memory_per_unit
from zetta_ray.sim.parallel import ParallelSpec

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["DoesNotFitError", "SearchSpec", "SimSpec", "SpecError", "check_fits", "load_spec", "parse_spec"]

_MODEL_KEYS = {
    "kind", "layers", "hidden", "heads", "seq_len", "vocab", "ffn_hidden", "n_experts", "top_k", "moe_every",
    "kv_heads", "gated_mlp", "flash_attention", "capacity_factor", "expert_imbalance",
}  # fmt: skip
_MOE_ONLY = ("n_experts", "top_k", "moe_every", "capacity_factor", "expert_imbalance")
_HW_COMMON = {
    "units", "precision", "optical_circuits", "core_oversubscription", "storage_bandwidth_gb_s",
    "memory_pool_gb_per_unit", "memory_pool_bandwidth_gb_s",
}  # fmt: skip
_UNIT_KEYS = {"name", "peak_tflops", "hbm_gb", "hbm_bandwidth_gb_s", "matmul_fraction"}
_TIER_KEYS = {"name", "domain_units", "bandwidth_gb_s", "latency_us", "oversubscription", "optical"}
_PARALLEL_KEYS = {
    "tp", "pp", "dp", "ep", "virtual_stages", "micro_batch", "global_batch", "recompute",
    "sequence_parallel", "zero1", "overlap_comm",
}  # fmt: skip
_SEARCH_KEYS = {"global_batch", "min_utilization", "overlap_comm"}
_FAILURE_KEYS = {
    "unit_mtbf_hours", "node_mtbf_hours", "link_mtbf_hours", "restart_s", "detect_s", "swap_s",
    "snapshot_every",
}  # fmt: skip
_TOP_KEYS = {"name", "model", "hardware", "parallel", "search", "failures"}


@dataclass(kw_only=True, slots=True, frozen=True)
class SearchSpec:
    """Options of ``parallel = "auto"``.

    ``global_batch`` (sequences per step) defaults to the unit count, the weak-scaling rule of the
    Megatron papers (batch 3,072 on 3,072 GPUs); the search rounds it to whole micro-batches per
    replica. ``min_utilization`` is the least share of units the mesh must use; the rest are spares.
    """

    global_batch: int | None = None
    min_utilization: float = 0.9
    overlap_comm: bool = True

    def __post_init__(self) -> None:
        if self.global_batch is not None and (
            not isinstance(self.global_batch, int) or self.global_batch < 1
        ):
            raise SpecError(f"search.global_batch={self.global_batch!r} must be a positive integer")
        if not 0 < self.min_utilization <= 1:
            raise SpecError(f"search.min_utilization={self.min_utilization!r} must be in (0, 1]")


@dataclass(kw_only=True, slots=True, frozen=True)
class SimSpec:
    """A whole simulation request: model, machine, mesh (None means search) and failures."""

    name: str = "spec"
    model: ModelSpec
    hardware: Hardware
    parallel: ParallelSpec | None
    search: SearchSpec = field(default_factory=SearchSpec)
    failures: FailureSpec | None = None
    efficiency: Efficiency = CALIBRATED

    @property
    def auto(self) -> bool:
        return self.parallel is None


def _table(raw: Any, where: str, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(raw, Mapping):
        raise SpecError(f"[{where}] must be a table, got {type(raw).__name__}")
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise SpecError(f"unknown key(s) {unknown} in [{where}]; allowed: {sorted(allowed)}")
    return dict(raw)


def _typed(values: dict[str, Any], where: str, cls: type) -> Any:
    try:
        return cls(**values)
    except TypeError as e:  # a missing required key
        raise SpecError(f"[{where}] is incomplete or mistyped: {e}") from e


def _model(raw: Any) -> ModelSpec:
    values = _table(raw, "model", _MODEL_KEYS)
    if values.get("kind", "dense") == "dense":
        stray = [k for k in _MOE_ONLY if k in values]
        if stray:
            raise SpecError(f"[model] keys {stray} are for kind = 'moe'; this model is dense")
    return _typed(values, "model", ModelSpec)


def _num(value: Any, where: str, kind: type = float) -> Any:
    """``value`` as ``kind`` (int or float), or a ``SpecError`` naming the key."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or (kind is int and not isinstance(value, int)):
        raise SpecError(f"{where} = {value!r} must be a{'n integer' if kind is int else ' number'}")
    return kind(value)


def _unit(raw: Any) -> UnitFigures:
    v = _table(raw, "hardware.unit", _UNIT_KEYS)
    peak = _table(
        v.get("peak_tflops", {}), "hardware.unit.peak_tflops", {"fp8", "bf16", "fp16", "tf32", "fp32"}
    )
    return UnitFigures(
        name=str(v.get("name", "unit")),
        peak_flops={k: _num(x, f"hardware.unit.peak_tflops.{k}") * 1e12 for k, x in peak.items()},
        hbm_bytes=_num(v.get("hbm_gb", 80), "hardware.unit.hbm_gb") * 1e9,
        hbm_bandwidth=_num(v.get("hbm_bandwidth_gb_s", 3350), "hardware.unit.hbm_bandwidth_gb_s") * 1e9,
        matmul_fraction=_num(v.get("matmul_fraction", 0.8), "hardware.unit.matmul_fraction"),
    )


def _tier(raw: Any, i: int) -> TierFigures:
    v = _table(raw, f"hardware.tiers[{i}]", _TIER_KEYS)
    for key in ("name", "domain_units", "bandwidth_gb_s"):
        if key not in v:
            raise SpecError(f"hardware.tiers[{i}] needs {key!r}")
    w = f"hardware.tiers[{i}]"
    return TierFigures(
        name=str(v["name"]),
        domain_units=_num(v["domain_units"], f"{w}.domain_units", int),
        bandwidth=_num(v["bandwidth_gb_s"], f"{w}.bandwidth_gb_s") * 1e9,
        latency=_num(v.get("latency_us", 5.0), f"{w}.latency_us") * 1e-6,
        oversubscription=_num(v.get("oversubscription", 1.0), f"{w}.oversubscription"),
        optical=bool(v.get("optical", False)),
    )


def _hardware(raw: Any) -> Hardware:
    explicit = isinstance(raw, Mapping) and "preset" not in raw
    allowed = _HW_COMMON | ({"unit", "tiers"} if explicit else {"preset"})
    v = _table(raw, "hardware", allowed)
    if "units" not in v:
        raise SpecError("[hardware] needs units = <number of compute units>")
    units = _num(v["units"], "hardware.units", int)
    if explicit:
        if "unit" not in v or "tiers" not in v:
            raise SpecError(
                "[hardware] needs either preset = '<name>' or both unit = {...} and tiers = [...]"
            )
        tiers = tuple(_tier(t, i) for i, t in enumerate(v["tiers"]))
        hw = Hardware(name="custom", units=units, unit=_unit(v["unit"]), tiers=tiers)
    else:
        hw = preset(str(v["preset"]), units=units)
    changes: dict[str, Any] = {}
    if "precision" in v:
        changes["precision"] = str(v["precision"])
    if "optical_circuits" in v:
        changes["optical_circuits"] = bool(v["optical_circuits"])
    for key, name in (
        ("storage_bandwidth_gb_s", "storage_bandwidth"),
        ("memory_pool_gb_per_unit", "memory_pool_bytes_per_unit"),
        ("memory_pool_bandwidth_gb_s", "memory_pool_bandwidth"),
    ):
        if key in v:
            changes[name] = _num(v[key], f"hardware.{key}") * 1e9
    hw = replace(hw, **changes) if changes else hw
    if "core_oversubscription" in v:
        hw = with_core_taper(hw, _num(v["core_oversubscription"], "hardware.core_oversubscription"))
    return hw


def parse_spec(raw: Mapping[str, Any], *, name: str = "spec") -> SimSpec:
    """A validated ``SimSpec`` from a parsed TOML mapping. Raises ``SpecError`` / ``ConfigError``."""
    _table(raw, "spec", _TOP_KEYS)
    for key in ("model", "hardware"):
        if key not in raw:
            raise SpecError(f"the spec needs a [{key}] table")
    model = _model(raw["model"])
    hardware = _hardware(raw["hardware"])
    par_raw = raw.get("parallel", "auto")
    parallel: ParallelSpec | None
    if par_raw == "auto":
        parallel = None
    elif isinstance(par_raw, str):
        raise SpecError(f'parallel = {par_raw!r} is invalid: write parallel = "auto" or a [parallel] table')
    else:
        parallel = _typed(_table(par_raw, "parallel", _PARALLEL_KEYS), "parallel", ParallelSpec)
        parallel.check(model, hardware.units)
    if "search" in raw and parallel is not None:
        raise SpecError('[search] only applies with parallel = "auto"; remove it or the [parallel] table')
    search = _typed(_table(raw.get("search", {}), "search", _SEARCH_KEYS), "search", SearchSpec)
    failures = None
    if "failures" in raw:
        failures = _typed(_table(raw["failures"], "failures", _FAILURE_KEYS), "failures", FailureSpec)
    spec = SimSpec(
        name=str(raw.get("name", name)),
        model=model,
        hardware=hardware,
        parallel=parallel,
        search=search,
        failures=failures,
    )
    if parallel is not None:
        check_fits(model, parallel, hardware)
    return spec


def check_fits(model: ModelSpec, par: ParallelSpec, hw: Hardware) -> None:
    """Raise ``DoesNotFitError`` naming the shortfall and the levers if the fullest unit overflows."""
    mem = memory_per_unit(model, par)
    if mem.total > hw.unit.hbm_bytes:
        gb = 1e9
        raise DoesNotFitError(
            f"the model does not fit: the fullest unit needs {mem.total / gb:.1f} GB (weights "
            f"{mem.parameters / gb:.1f}, gradients {mem.gradients / gb:.1f}, "
            f"optimizer {mem.optimizer / gb:.1f}, "
            f"activations {mem.activations / gb:.1f}, reserved {mem.reserved / gb:.1f}) but a "
            f"{hw.unit.name} has {hw.unit.hbm_bytes / gb:.0f} GB. Raise tp or pp (or ep for experts), set "
            "recompute = 'selective' or 'full', sequence_parallel = true or zero1 = true, lower micro_batch, "
            'or use parallel = "auto"'
        )


def load_spec(path: str | Path) -> SimSpec:
    """Read and validate a spec file (TOML)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise SpecError(f"cannot read spec {str(path)!r}: {e}") from e
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"spec {str(path)!r} is not valid TOML: {e}") from e
    return parse_spec(raw, name=path.stem)
