"""Device and network-tier *figures* the analytical model reads: peak FLOP/s, HBM, link bandwidths.

This module holds numbers, not structure. Which unit sits in which node, rack and pod, and which
failure domain a replica may share, is the placement layer's ``Topology`` (``zetta_ray.placement``);
the simulator builds one from these figures when it needs a concrete machine. Here a network is a
list of tiers, innermost first, each with the number of units one domain of that tier holds:

    tier        domain_units   bandwidth per unit      what it is on a DGX A100 SuperPOD
    nvlink                 8   300 GB/s per direction  NVSwitch inside one DGX
    leaf                 160    25 GB/s                one scalable unit (20 DGX) on its leaf switches
    spine               1120    25 GB/s                one SuperPOD (140 DGX), non-blocking
    core        whole machine   25 GB/s / taper        the layer that joins pods (optical in the seed)

``bandwidth`` is what one unit can push across that tier (its NIC share for the scale-out tiers);
``oversubscription`` is the static fat-tree taper at that tier (1 = non-blocking). A tier marked
``optical`` is built from circuit switches whose circuits can be set per job: with
``Hardware.optical_circuits`` the job's own traffic sees no taper there (see ``sim/fabric.py``).

Sources for the presets (datasheet figures, dense, no sparsity):
  A100 SXM4 80GB: 312 TFLOP/s FP16/BF16 tensor, 156 TF32, 19.5 FP32; 80 GB HBM2e at 2,039 GB/s; NVLink 3
  600 GB/s total (300 GB/s each way). DGX A100: 8 GPUs, 8 x ConnectX-6 HDR 200 Gb/s for compute (25 GB/s
  per GPU), 2 TB host DRAM. SuperPOD: 20-node scalable units, 140 nodes per pod, full fat-tree.
  H100 SXM5 80GB: 989 TFLOP/s BF16, 1,979 FP8, 495 TF32, 67 FP32; 80 GB HBM3 at 3,350 GB/s; NVLink 4
  900 GB/s total (450 GB/s each way). DGX H100: 8 x ConnectX-7 NDR 400 Gb/s (50 GB/s per GPU), 2 TB host
  DRAM. SuperPOD: 32-node scalable units.
  Achievable matmul ceilings (``matmul_fraction``): 267.9 of 312 TFLOP/s on A100 SXM and 792.1 of 989 on
  H100 SXM, BF16, from the MAMF table of S. Bekman's "Machine Learning Engineering" (mamf-finder.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from zetta_ray.errors import ConfigError

__all__ = ["PRESETS", "Hardware", "TierFigures", "UnitFigures", "preset"]

PRECISIONS = ("fp8", "bf16", "fp16", "tf32", "fp32")


def _require(ok: bool, where: str, value: Any, fix: str) -> None:
    if not ok:
        raise ConfigError(f"{where}={value!r} is invalid: {fix}")


@dataclass(kw_only=True, slots=True, frozen=True)
class UnitFigures:
    """One compute unit: peak dense FLOP/s per precision and its high-bandwidth memory.

    ``matmul_fraction`` is the measured "maximum achievable matmul FLOPS" (MAMF) over the datasheet
    peak: the ceiling a perfectly shaped 16-bit GEMM reaches on this device and software stack. The
    step model's efficiency constants are fractions of that ceiling, so they carry across devices;
    MFU stays quoted against the datasheet peak, as papers do.
    """

    name: str
    peak_flops: Mapping[str, float]
    hbm_bytes: float
    hbm_bandwidth: float
    matmul_fraction: float = 0.8

    def __post_init__(self) -> None:
        _require(
            bool(self.peak_flops), "unit.peak_flops", dict(self.peak_flops), "give at least one precision"
        )
        for prec, flops in self.peak_flops.items():
            _require(prec in PRECISIONS, "unit.peak_flops key", prec, f"use one of {list(PRECISIONS)}")
            _require(flops > 0, f"unit.peak_flops[{prec}]", flops, "must be > 0 FLOP/s")
        _require(self.hbm_bytes > 0, "unit.hbm_bytes", self.hbm_bytes, "must be > 0 bytes")
        _require(self.hbm_bandwidth > 0, "unit.hbm_bandwidth", self.hbm_bandwidth, "must be > 0 B/s")
        _require(0 < self.matmul_fraction <= 1, "unit.matmul_fraction", self.matmul_fraction, "in (0, 1]")

    def peak(self, precision: str) -> float:
        """Peak dense FLOP/s at ``precision``; fp16 and bf16 stand in for each other."""
        if precision in self.peak_flops:
            return float(self.peak_flops[precision])
        twin = {"bf16": "fp16", "fp16": "bf16"}.get(precision)
        if twin in self.peak_flops:
            return float(self.peak_flops[twin])
        raise ConfigError(
            f"unit {self.name!r} has no peak for precision {precision!r}; it has {sorted(self.peak_flops)}"
        )


@dataclass(kw_only=True, slots=True, frozen=True)
class TierFigures:
    """One network tier: how many units one domain holds, and what a unit can send across it."""

    name: str
    domain_units: int
    bandwidth: float
    latency: float
    oversubscription: float = 1.0
    optical: bool = False

    def __post_init__(self) -> None:
        w = f"tier {self.name!r}"
        _require(self.domain_units >= 1, f"{w}.domain_units", self.domain_units, "must be >= 1")
        _require(self.bandwidth > 0, f"{w}.bandwidth", self.bandwidth, "must be > 0 B/s per unit")
        _require(self.latency >= 0, f"{w}.latency", self.latency, "must be >= 0 s")
        _require(self.oversubscription >= 1, f"{w}.oversubscription", self.oversubscription, "must be >= 1")


@dataclass(kw_only=True, slots=True, frozen=True)
class Hardware:
    """A machine as figures: ``units`` copies of ``unit`` joined by ``tiers`` (innermost first).

    ``memory_pool_bytes_per_unit`` / ``memory_pool_bandwidth`` describe the CXL or host-DRAM pools that
    hold trickle-checkpoint replicas (per unit: a DGX's 2 TB of host DRAM over its 8 GPUs, written at
    NIC speed); ``storage_bandwidth`` is the aggregate write bandwidth of the durable store used by
    global checkpoints (default 10 TB/s, the class of the largest parallel file systems today, e.g.
    Frontier's Orion). The last tier's domain is stretched to cover every unit.
    """

    name: str
    units: int
    unit: UnitFigures
    tiers: tuple[TierFigures, ...]
    precision: str = "bf16"
    optical_circuits: bool = False
    memory_pool_bytes_per_unit: float = 256e9
    memory_pool_bandwidth: float = 25e9
    storage_bandwidth: float = 10e12
    notes: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        _require(self.units >= 1, "hardware.units", self.units, "must be >= 1")
        _require(len(self.tiers) >= 1, "hardware.tiers", self.tiers, "give at least one tier")
        self.unit.peak(self.precision)
        last = 0
        for tier in self.tiers:
            _require(
                tier.domain_units > last,
                f"tier {tier.name!r}.domain_units",
                tier.domain_units,
                f"must grow outward (the tier inside it holds {last}); list tiers innermost first",
            )
            last = tier.domain_units
        _require(
            self.storage_bandwidth > 0, "hardware.storage_bandwidth", self.storage_bandwidth, "must be > 0"
        )
        _require(
            self.memory_pool_bandwidth > 0,
            "hardware.memory_pool_bandwidth",
            self.memory_pool_bandwidth,
            "> 0",
        )

    @property
    def peak_flops(self) -> float:
        """Peak dense FLOP/s of one unit at the configured precision."""
        return self.unit.peak(self.precision)

    def domain(self, k: int) -> int:
        """Units in one domain of tier ``k``; the outermost tier spans the whole machine."""
        if k == len(self.tiers) - 1:
            return max(self.tiers[k].domain_units, self.units)
        return self.tiers[k].domain_units

    @property
    def achievable_flops(self) -> float:
        """What a perfectly shaped GEMM reaches on one unit (peak x ``unit.matmul_fraction``)."""
        return self.peak_flops * self.unit.matmul_fraction

    def effective_bandwidth(self, k: int) -> float:
        """Per-unit bandwidth across tier ``k``: taper applies unless per-job optical circuits remove it."""
        tier = self.tiers[k]
        if tier.optical and self.optical_circuits:
            return tier.bandwidth
        return tier.bandwidth / tier.oversubscription

    def with_(self, **changes: Any) -> Hardware:
        """A copy with some fields changed (e.g. ``units`` or ``optical_circuits``)."""
        return replace(self, **changes)


def _tiers(
    nvlink_bw: float, nic_bw: float, leaf: int, pod: int, core_taper: float
) -> tuple[TierFigures, ...]:
    return (
        TierFigures(name="nvlink", domain_units=8, bandwidth=nvlink_bw, latency=2e-6),
        TierFigures(name="leaf", domain_units=leaf, bandwidth=nic_bw, latency=5e-6),
        TierFigures(name="spine", domain_units=pod, bandwidth=nic_bw, latency=7e-6),
        TierFigures(
            name="core", domain_units=pod * 2, bandwidth=nic_bw, latency=10e-6,
            oversubscription=core_taper, optical=True,
        ),
    )  # fmt: skip


_A100 = UnitFigures(
    name="A100-SXM4-80GB",
    peak_flops={"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
    hbm_bytes=80e9,
    hbm_bandwidth=2.039e12,
    matmul_fraction=267.9 / 312,
)
_H100 = UnitFigures(
    name="H100-SXM5-80GB",
    peak_flops={"fp8": 1979e12, "bf16": 989e12, "fp16": 989e12, "tf32": 495e12, "fp32": 67e12},
    hbm_bytes=80e9,
    hbm_bandwidth=3.35e12,
    matmul_fraction=792.1 / 989,
)

PRESETS: dict[str, Hardware] = {
    "dgx-a100-80gb": Hardware(
        name="dgx-a100-80gb",
        units=8,
        unit=_A100,
        tiers=_tiers(nvlink_bw=300e9, nic_bw=25e9, leaf=160, pod=1120, core_taper=1.0),
        memory_pool_bytes_per_unit=2e12 / 8,
        memory_pool_bandwidth=25e9,
        notes=("A100 and DGX A100 datasheets; DGX SuperPOD reference architecture (Selene class)",),
    ),
    "dgx-h100-80gb": Hardware(
        name="dgx-h100-80gb",
        units=8,
        unit=_H100,
        tiers=_tiers(nvlink_bw=450e9, nic_bw=50e9, leaf=256, pod=2048, core_taper=1.0),
        memory_pool_bytes_per_unit=2e12 / 8,
        memory_pool_bandwidth=50e9,
        notes=("H100 and DGX H100 datasheets; DGX H100 SuperPOD reference architecture",),
    ),
}


def preset(name: str, *, units: int | None = None, **changes: Any) -> Hardware:
    """A preset machine by name, optionally resized to ``units`` and with fields overridden."""
    if name not in PRESETS:
        raise ConfigError(f"hardware.preset={name!r} is unknown: use one of {sorted(PRESETS)}")
    hw = PRESETS[name]
    if units is not None:
        changes["units"] = units
    return replace(hw, **changes) if changes else hw


def with_core_taper(hw: Hardware, taper: float) -> Hardware:
    """A copy whose outermost (core) tier is oversubscribed ``taper``:1 in the static fat-tree."""
    core = replace(hw.tiers[-1], oversubscription=float(taper))
    return replace(hw, tiers=(*hw.tiers[:-1], core))


def tier_of_span(hw: Hardware, span: int) -> int:
    """Index of the innermost tier whose domain holds ``span`` consecutive units."""
    for k in range(len(hw.tiers)):
        if hw.domain(k) >= span:
            return k
    return len(hw.tiers) - 1
