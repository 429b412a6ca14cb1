"""Text and JSON for ``zetta-ray simulate SPEC.toml [--json]``.

Wiring into the CLI is one line: ``out.write(render(args.spec, as_json=args.json) + "\\n")``, or call
``main_simulate(path, as_json)`` which does that and returns the exit status. Errors are
``ConfigError`` subclasses (``SpecError``, ``DoesNotFitError``) for the CLI's usual handler.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, TextIO

from zetta_ray.quantities import format_amount
from zetta_ray.sim.simulate import simulate

__all__ = ["format_report", "main_simulate", "render"]


def _seconds(x: float) -> str:
    if x >= 3600:
        return f"{x / 3600:.2f} h"
    if x >= 60:
        return f"{x / 60:.1f} min"
    return f"{x:.3g} s"


def format_report(result: dict[str, Any]) -> str:
    """A readable summary of a ``simulate`` result."""
    m, hw, mesh = result["model"], result["hardware"], result["mesh"]
    lines = [
        f"zetta-ray simulate: {result['name']}",
        f"  model     {m['kind']}, {format_amount(m['total_params'], 'params')}"
        f" ({format_amount(m['active_params'], 'active')}),"
        f" {m['layers']} layers, hidden {m['hidden']}"
        + (f", {m['n_experts']} experts top-{m['top_k']}" if m["kind"] == "moe" else ""),
        f"  machine   {hw['units']:,} x {hw['unit']} ({hw['name']}, {hw['precision']}), tiers "
        + ", ".join(f"{t['name']} {format_amount(t['bandwidth_bytes_per_s'], 'B/s')}" for t in hw["tiers"]),
        f"  mesh      tp {mesh['tp']} x pp {mesh['pp']} x dp {mesh['dp']}"
        f" (ep {mesh['ep']}, v {mesh['virtual_stages']}),"
        f" micro-batch {mesh['micro_batch']} x {mesh['micro_batches']}, batch {mesh['global_batch']:,},"
        f" recompute {mesh['recompute']}, sp {mesh['sequence_parallel']}, zero1 {mesh['zero1']}"
        + (" [auto]" if mesh["auto"] else ""),
        f"            {mesh['units_used']:,} units used, {mesh['spare_units']:,} spare",
        f"  step      {_seconds(result['step_time_s'])}, MFU {result['mfu']:.1%}, "
        f"{format_amount(result['tokens_per_s'], 'tokens/s')}",
        f"  memory    {result['memory_per_unit_bytes'] / 1e9:.1f} GB on the fullest unit "
        f"(of {hw['hbm_bytes_per_unit'] / 1e9:.0f} GB)",
        "  traffic   per unit per step: "
        + ", ".join(
            f"{k} {format_amount(v, 'B')}" for k, v in result["bytes_per_tier_per_unit"].items() if v > 0
        ),
    ]
    opt = result.get("optical")
    if opt:
        lines.append(
            f"  optical   per-job circuits vs static fat-tree ({opt['core_oversubscription_static']:g}:1 at "
            f"{opt['core_tier']}): step {_seconds(opt['step_time_circuits_s'])} vs "
            f"{_seconds(opt['step_time_static_s'])}, speedup {opt['speedup']:.2f}x"
        )
    work = result.get("stage_work_by_kind_s", {})
    busy = sum(v for k, v in work.items() if k != "experts")
    if busy > 0:
        lines.append(
            "  work      per stage per step: "
            + ", ".join(f"{k} {v / busy:.0%}" for k, v in work.items() if k != "experts" and v > 0)
        )
    place = result.get("placement")
    if place and "error" in place:
        lines.append(f"  placement infeasible: {place['error']}")
    elif place:
        spans = place["group_spans"]
        lines.append(
            f"  placement {place['expert_groups']:,} expert groups of {place['units_per_group']} units, "
            f"{place['experts_per_unit_per_layer']} experts/unit/layer; a group spans "
            f"{spans['nodes']} nodes, {spans['racks']} racks, {spans['pods']} pods; replicas off-node "
            f"{place['replicas_off_node']}; MoE layer {_seconds(place['moe_layer_time_per_step_s'])}/step "
            f"(placement cost model) vs {_seconds(place['analytic_moe_layer_time_per_step_s'])} (analytic)"
        )
    if "goodput" in result:
        f = result["failures"]
        lines.append(
            f"  failures  job MTBF {_seconds(f['job_mtbf_s'])}; goodput {result['goodput']:.1%} with trickle "
            f"checkpoints and local recovery, {result['goodput_global_checkpoint']:.1%} with global "
            f"checkpoints every {_seconds(f['global']['interval_s'])}"
        )
        for row in f["scale"]:
            lines.append(
                f"            at {row['units']:>9,} units: MTBF {_seconds(row['job_mtbf_s']):>9}, "
                f"trickle {row['trickle']['goodput']:.1%}, global {row['global']['goodput']:.1%}"
            )
    if "search" in mesh:
        s = mesh["search"]
        lines.append(
            f"  search    {s['evaluated']:,} meshes tried, {s['fitted']:,} fit, {s['seconds']:.2f} s"
        )
    return "\n".join(lines)


def render(path: str | Path, *, as_json: bool = False) -> str:
    """Simulate the spec at ``path`` and return the JSON object (``as_json``) or the text report."""
    result = simulate(path)
    return json.dumps(result, indent=2, sort_keys=True) if as_json else format_report(result)


def main_simulate(path: str | Path, as_json: bool = False, out: TextIO | None = None) -> int:
    """``zetta-ray simulate``: write the report to ``out`` (stdout) and return 0."""
    (out or sys.stdout).write(render(path, as_json=as_json) + "\n")
    return 0
