"""Per-job optical circuits against a static fat-tree: what reconfiguring the core buys one job.

A static fat-tree is built once for every job. Above the pods it is usually tapered (oversubscribed
``k:1``) because a non-blocking core for a million units costs more than the traffic most jobs send
through it; a job whose expert groups or data-parallel rings span pods then shares a ``1/k`` slice of
its NIC bandwidth at the core.

An optical circuit switch (OCS) at the core is a patch panel the control plane rewires per job (the
seed's data-fabric manager; Google's Apollo/Jupiter and TPU v4 slices do this today). The job's EP
groups and DP rings get direct pod-to-pod circuits sized to their traffic, so inside the job the core
behaves as non-blocking: the taper disappears for the collectives that cross it. Modelled as the core
tier's ``oversubscription`` applying (static) or not (circuits), everything else equal. Limits: the
circuit count per pod is bounded by the switch radix (a job spanning more pods than OCS ports per pod
would need two hops), and reconfiguration (milliseconds to seconds) is paid once per job; neither is
charged here.
"""

from __future__ import annotations

from dataclasses import replace

from zetta_ray.model_spec import ModelSpec
from zetta_ray.sim import comm
from zetta_ray.sim.calibration import CALIBRATED, Efficiency
from zetta_ray.sim.hardware import Hardware
from zetta_ray.sim.parallel import ParallelSpec
from zetta_ray.sim.step import step

__all__ = ["circuit_gain"]

_PROBE_BYTES = 1e9


def _a2a_bandwidth(hw: Hardware, eff: Efficiency, par: ParallelSpec) -> float:
    """Bytes per second one unit achieves in its expert group's all-to-all (1 GB probe)."""
    if par.ep <= 1:
        return 0.0
    return _PROBE_BYTES / comm.all_to_all(hw, eff, par.ep_group, _PROBE_BYTES).time


def circuit_gain(
    model: ModelSpec, par: ParallelSpec, hw: Hardware, eff: Efficiency = CALIBRATED
) -> dict[str, float | str]:
    """Step time and all-to-all bandwidth with per-job circuits versus the static (tapered) fat-tree."""
    static = replace(hw, optical_circuits=False)
    circuits = replace(hw, optical_circuits=True)
    s = step(model, par, static, eff, check=False)
    c = step(model, par, circuits, eff, check=False)
    core = hw.tiers[-1]
    return {
        "core_tier": core.name,
        "core_oversubscription_static": core.oversubscription,
        "step_time_static_s": s.step_time_s,
        "step_time_circuits_s": c.step_time_s,
        "speedup": s.step_time_s / c.step_time_s,
        "a2a_bandwidth_static_bytes_per_s": _a2a_bandwidth(static, eff, par),
        "a2a_bandwidth_circuits_bytes_per_s": _a2a_bandwidth(circuits, eff, par),
        "core_bytes_per_unit_per_step": s.bytes_per_tier.get(core.name, 0.0),
    }
