"""The ``zetta-ray plan`` report: a placement as a JSON document and as the text table the command prints.

``plan_document(topology, workload, plan)`` is what ``zetta-ray plan --json`` writes: ``Placement.to_dict``
plus the workload, the bytes per link tier and the round-robin baseline. ``format_plan(doc)`` renders
that document as text (a header, one row per expert, bytes per link tier, the predicted step time); it
reads only the document, so a saved ``--json`` renders the same. The simulator's report is
``zetta_ray/sim/report.py``. Pure numpy, no Ray.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from zetta_ray.placement.baselines import round_robin
from zetta_ray.placement.cost import TOKENS, Workload
from zetta_ray.placement.plan import InfeasiblePlacementError, Placement
from zetta_ray.placement.topology import Tier, Topology
from zetta_ray.quantities import format_amount

__all__ = ["format_plan", "plan_document"]


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _link_tiers(topology: Topology, plan: Placement) -> list[dict[str, Any]]:
    """Per link tier that carries bytes: its bandwidth and latency, and the plan's bytes per step on it."""
    e = plan.cost.edges
    rows = []
    for tier in Tier:
        mine = e.tier_Y == tier
        if not mine.any():
            continue
        tokens = mine & (e.kind_Y == TOKENS)
        rows.append(
            {
                "tier": tier.name,
                "bandwidth_bytes_per_s": _finite(topology.links.bandwidth_T[tier]),
                "latency_s": float(topology.links.latency_T[tier]),
                "edges": int(mine.sum()),
                "token_bytes": float(e.bytes_Y[tokens].sum()),
                "snapshot_bytes": float(e.bytes_Y[mine & ~tokens].sum()),
            }
        )
    return rows


def _round_robin(topology: Topology, workload: Workload) -> dict[str, Any]:
    try:
        rr = round_robin(topology, workload)
    except InfeasiblePlacementError as e:
        return {"error": " ".join(str(e).split())}
    return {"step_time_s": rr.step_time_s, "cost": rr.cost.to_dict()}


def _workload_summary(w: Workload, zipf: float | None) -> dict[str, Any]:
    return {
        "n_layers": w.n_layers,
        "n_experts": w.n_experts,
        "top_k": w.top_k,
        "d_model": w.d_model,
        "d_ff": w.d_ff,
        "tokens_per_step": w.tokens_per_step,
        "load": f"zipf exponent {zipf:g}" if zipf else "uniform",
        "n_dense": w.n_dense,
        "replicas": w.replicas,
        "snapshot_bytes": w.snapshot_bytes,
        "max_expert_memory_bytes": float(w.memory_X.max()),
    }


def plan_document(
    topology: Topology, workload: Workload, plan: Placement, *, zipf: float | None = None
) -> dict[str, Any]:
    """What ``zetta-ray plan --json`` writes: ``Placement.to_dict`` (method, seed, topology summary, cost,
    dense units, one row per expert with its links), the workload, bytes per link tier, and the
    round-robin baseline's predicted step time (or why it cannot place the workload)."""
    baseline = _round_robin(topology, workload)
    doc = plan.to_dict(topology, workload)
    doc.update(
        step_time_s=plan.step_time_s,
        workload=_workload_summary(workload, zipf),
        link_tiers=_link_tiers(topology, plan),
        round_robin=baseline,
    )
    if "step_time_s" in baseline:
        doc["speedup_vs_round_robin"] = baseline["step_time_s"] / plan.step_time_s
    return doc


def _secs(s: float) -> str:
    if s == 0:
        return "0 s"
    for scale, unit in ((1.0, "s"), (1e-3, "ms"), (1e-6, "us")):
        if s >= scale:
            return f"{s / scale:.3g} {unit}"
    return f"{s / 1e-9:.3g} ns"


def _short(name: str, width: int = 24) -> str:
    """A node name fit for a column: Ray node ids (56 hex digits) keep their first 12."""
    return name if len(name) <= width else name[:12] + "..."


def _columns(header: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> list[str]:
    """Aligned text columns; the columns in ``right`` are right-aligned."""
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        out = (
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )
        return ("  " + "  ".join(out)).rstrip()

    return [line(header), *(line(r) for r in rows)]


def _expert_row(row: dict[str, Any]) -> list[str]:
    tokens: dict[str, float] = {}
    snaps = []
    for link in row["links"]:
        if link["kind"] == "tokens":
            tokens[link["tier"]] = tokens.get(link["tier"], 0.0) + link["bytes"]
        else:
            snaps.append(f"{link['tier']} {format_amount(link['bytes'])} to {_short(link['peer_node'])}")
    return [
        f"L{row['layer']}/E{row['expert']}",
        str(row["unit"]),
        row["kind"],
        _short(row["node"]),
        f"{row['load']:.1%}",
        ", ".join(f"{tier} {format_amount(b)}" for tier, b in tokens.items()),
        "; ".join(snaps) or "-",
    ]


def _count(n: int, word: str) -> str:
    return f"{n:,} {word}" + ("" if n == 1 else "s")


def _header_lines(doc: dict[str, Any]) -> list[str]:
    t, w = doc["topology"], doc["workload"]
    kinds = ", ".join(f"{k} {v['units']:,}" for k, v in t["kinds"].items() if v["units"])
    dense = "; ".join(f"unit {d['unit']} ({d['kind']}, node {_short(d['node'])})" for d in doc["dense"])
    replicas = w["replicas"]
    snapshots = (
        f"{_count(replicas, 'snapshot replica')} per expert ({format_amount(w['snapshot_bytes'])} each)"
        if replicas
        else "no snapshot replicas"
    )
    return [
        f"zetta-ray plan: {t['name']}, {t['units']:,} units ({kinds}) on {_count(t['nodes'], 'node')}, "
        f"{_count(t['racks'], 'rack')}, {_count(t['pods'], 'pod')}; {_count(t['pools'], 'memory pool')}",
        f"  workload  {_count(w['n_layers'], 'MoE layer')} x {w['n_experts']} experts, top-{w['top_k']}, "
        f"d_model {w['d_model']}, d_ff {w['d_ff']}; {w['tokens_per_step']:,} tokens/step, load "
        f"{w['load']}; {_count(w['n_dense'], 'dense unit')}; {snapshots}",
        f"  dense     {dense}",
        f"  method    {doc['method']} (seed {doc['seed']})",
    ]


def _tier_lines(doc: dict[str, Any]) -> list[str]:
    rr = doc["round_robin"].get("cost", {}).get("bytes_by_tier", {})
    rows = [
        [
            r["tier"],
            "-" if r["bandwidth_bytes_per_s"] is None else format_amount(r["bandwidth_bytes_per_s"]) + "/s",
            _secs(r["latency_s"]) if r["latency_s"] else "-",
            f"{r['edges']:,}",
            format_amount(r["token_bytes"]),
            format_amount(r["snapshot_bytes"]),
            format_amount(r["token_bytes"] + r["snapshot_bytes"]),
            format_amount(rr.get(r["tier"], 0.0)) if rr else "-",
        ]
        for r in doc["link_tiers"]
    ]
    header = ["tier", "bandwidth", "latency", "edges", "token rows", "snapshots", "total", "round-robin"]
    return ["  bytes per step by link tier:", *_columns(header, rows, right={1, 2, 3, 4, 5, 6, 7})]


def _step_lines(doc: dict[str, Any]) -> list[str]:
    c, rr = doc["cost"], doc["round_robin"]
    lines = [
        f"  predicted step {_secs(c['step_time_s'])}: dense compute {_secs(c['dense_compute_s'])}, "
        f"MoE layers {_secs(sum(c['layer_time_s']))}, snapshots {_secs(c['snapshot_s'])}"
    ]
    if "error" in rr:
        lines.append(f"  round-robin    cannot place this workload: {rr['error']}")
    else:
        lines.append(
            f"  round-robin    {_secs(rr['step_time_s'])} predicted "
            f"(this plan is {doc['speedup_vs_round_robin']:.2f}x as fast)"
        )
    return lines


def format_plan(doc: dict[str, Any], *, limit: int = 64) -> str:
    """The text ``zetta-ray plan`` prints for a ``plan_document``: a header, the first ``limit`` experts
    (all when ``limit`` is 0), bytes per link tier against round-robin, and the predicted step time."""
    experts = doc["experts"]
    shown = experts if limit <= 0 else experts[:limit]
    header = ["expert", "unit", "kind", "node", "load", "token rows/step", "snapshots/step"]
    lines = [*_header_lines(doc), ""]
    lines += _columns(header, [_expert_row(r) for r in shown], right={1, 4})
    if len(shown) < len(experts):
        lines.append(
            f"  ... {len(shown):,} of {len(experts):,} experts shown; --limit 0 shows all, --json PATH "
            "writes all"
        )
    return "\n".join([*lines, "", *_tier_lines(doc), "", *_step_lines(doc)])
