"""``simulate(spec) -> dict``: plan (or check) a mesh, predict the step, the goodput and the fabric gain.

The result is one JSON-ready dict. The keys later tools rely on are ``step_time_s``, ``mfu``,
``tokens_per_s``, ``memory_per_unit_bytes`` (the fullest unit) and, when the spec has ``[failures]``,
``goodput`` (trickle checkpoints with local recovery, the design this project builds; the global
checkpoint figure sits beside it as ``goodput_global_checkpoint``). Everything else is detail:
the mesh, the time breakdown, bytes per tier, the optical-circuit comparison, the expert placement
summary from ``zetta_ray.placement`` (MoE only) and goodput at 1k, 100k and 1M units.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from zetta_ray.model_spec import ModelSpec
from zetta_ray.sim.fabric import circuit_gain
from zetta_ray.sim.failures import FailureSpec, goodput_global, goodput_trickle, job_mtbf_s
from zetta_ray.sim.hardware import Hardware
from zetta_ray.sim.machine import placement_summary
from zetta_ray.sim.parallel import ParallelSpec
from zetta_ray.sim.search import search
from zetta_ray.sim.spec import SimSpec, load_spec, parse_spec
from zetta_ray.sim.step import StepReport, step

__all__ = ["SCALES", "simulate"]

#: Unit counts of the goodput-at-scale table.
SCALES = (1_000, 100_000, 1_000_000)
#: Bytes per parameter a global checkpoint writes: fp32 master weights and two Adam moments, 16-bit weights.
CHECKPOINT_BYTES_PER_PARAM = 14.0


def _resolve(spec: SimSpec | Mapping[str, Any] | str | Path) -> SimSpec:
    if isinstance(spec, SimSpec):
        return spec
    if isinstance(spec, Mapping):
        return parse_spec(spec)
    return load_spec(Path(spec))


def _mesh(par: ParallelSpec) -> dict[str, Any]:
    return {
        "tp": par.tp,
        "pp": par.pp,
        "dp": par.dp,
        "ep": par.ep,
        "virtual_stages": par.virtual_stages,
        "micro_batch": par.micro_batch,
        "global_batch": par.global_batch,
        "micro_batches": par.micro_batches,
        "recompute": par.recompute,
        "sequence_parallel": par.sequence_parallel,
        "zero1": par.zero1,
        "overlap_comm": par.overlap_comm,
    }


def _model(m: ModelSpec) -> dict[str, Any]:
    return {
        "kind": m.kind,
        "total_params": m.total_params,
        "active_params": m.active_params,
        "layers": m.layers,
        "hidden": m.hidden,
        "heads": m.heads,
        "ffn_hidden": m.f,
        "n_experts": m.n_experts if m.kind == "moe" else 0,
        "top_k": m.top_k if m.kind == "moe" else 0,
        "moe_layers": m.moe_layers,
        "model_flops_per_token": m.model_flops_per_token(),
    }


def _hardware(hw: Hardware) -> dict[str, Any]:
    return {
        "name": hw.name,
        "unit": hw.unit.name,
        "units": hw.units,
        "precision": hw.precision,
        "peak_flops_per_unit": hw.peak_flops,
        "hbm_bytes_per_unit": hw.unit.hbm_bytes,
        "optical_circuits": hw.optical_circuits,
        "tiers": [
            {
                "name": t.name,
                "domain_units": hw.domain(k),
                "bandwidth_bytes_per_s": t.bandwidth,
                "latency_s": t.latency,
                "oversubscription": t.oversubscription,
                "optical": t.optical,
            }
            for k, t in enumerate(hw.tiers)
        ],
    }


def failure_summary(
    f: FailureSpec, model: ModelSpec, par: ParallelSpec, hw: Hardware, report: StepReport, units: int
) -> dict[str, Any]:
    """Goodput under global checkpoints and under trickle checkpoints, at this job's size and at SCALES.

    The scale rows keep this job's per-unit load (state per unit, step time, traffic per unit) and
    change only the unit count, and with it the job's failure rate and total state (weak scaling).
    """
    nic = hw.tiers[min(1, len(hw.tiers) - 1)].bandwidth
    unit_state = report.memory.parameters + report.memory.optimizer
    per_unit_ckpt = CHECKPOINT_BYTES_PER_PARAM * model.total_params / units
    scale_out_bytes = sum(b for k, b in enumerate(report.bytes_per_tier.values()) if k > 0)
    free_link = max(0.0, report.step_time_s - scale_out_bytes / nic)
    snapshot_bw = min(nic, hw.memory_pool_bandwidth)
    per_node = hw.tiers[0].domain_units

    def at(n: int) -> dict[str, Any]:
        mtbf = job_mtbf_s(f, units=n, units_per_node=per_node)
        g = goodput_global(
            f, mtbf_s=mtbf, state_bytes=per_unit_ckpt * n, storage_bandwidth=hw.storage_bandwidth,
            unit_write_bandwidth=nic, units=n,
        )  # fmt: skip
        t = goodput_trickle(
            f, mtbf_s=mtbf, step_s=report.step_time_s, unit_state_bytes=unit_state,
            snapshot_bandwidth=snapshot_bw, free_link_s=free_link,
        )  # fmt: skip
        return {"units": n, "job_mtbf_s": mtbf, "global": g.as_dict(), "trickle": t.as_dict()}

    here = at(units)
    return {
        **here,
        "unit_state_bytes": unit_state,
        "scale": [at(n) for n in SCALES],
    }


def simulate(spec: SimSpec | Mapping[str, Any] | str | Path, *, placement: bool = True) -> dict[str, Any]:
    """Predict one training step (searching the mesh for ``parallel = "auto"``) and what surrounds it.

    ``spec`` is a ``SimSpec``, a parsed TOML mapping, or a path to a spec file. ``placement=False``
    skips the expert placement summary (it builds the whole machine's topology).
    """
    s = _resolve(spec)
    started = time.perf_counter()
    search_info: dict[str, Any] | None = None
    if s.parallel is None:
        found = search(s.model, s.hardware, s.search, s.efficiency)
        par, report = found.parallel, found.report
        search_info = {"evaluated": found.evaluated, "fitted": found.fitted}
    else:
        par = s.parallel
        report = step(s.model, par, s.hardware, s.efficiency)
    used = s.hardware.with_(units=par.units)
    out: dict[str, Any] = {
        "name": s.name,
        "model": _model(s.model),
        "hardware": _hardware(s.hardware),
        "mesh": {
            **_mesh(par),
            "auto": s.auto,
            "units_used": par.units,
            "spare_units": s.hardware.units - par.units,
        },
        **report.as_dict(),
        "tokens_per_step": par.global_batch * s.model.seq_len,
        "optical": circuit_gain(s.model, par, used, s.efficiency),
    }
    if search_info is not None:
        search_info["seconds"] = time.perf_counter() - started
        out["mesh"]["search"] = search_info
    if placement and s.model.kind == "moe" and par.ep > 1:
        out["placement"] = placement_summary(s.model, par, used)
        out["placement"]["analytic_moe_layer_time_per_step_s"] = report.breakdown[
            "moe_layer_a2a_and_experts_per_step"
        ]
    if s.failures is not None:
        fails = failure_summary(s.failures, s.model, par, s.hardware, report, par.units)
        out["failures"] = fails
        out["goodput"] = fails["trickle"]["goodput"]
        out["goodput_global_checkpoint"] = fails["global"]["goodput"]
    out["plan_seconds"] = time.perf_counter() - started
    return out
