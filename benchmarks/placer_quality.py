"""Modelled step time of the placer against round-robin and random placement, for a skewed-load MoE on
the three-tier skewed machine (examples/topologies/three_tier_skewed.toml).

Prints one JSON object: for each Zipf exponent of the router's load (0 = uniform), the predicted step
time of each placement and its parts, and the ratios placer / round-robin and placer / random (the
median of a few random seeds). Lower is better; a ratio of 0.5 means the placer's step is half as long.

    python benchmarks/placer_quality.py [--topology FILE] [--experts 256] [--layers 2] [--random-seeds 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from zetta_ray.placement import (
    Placement,
    PlacerConfig,
    Topology,
    Workload,
    place,
    random_placement,
    round_robin,
    zipf_load,
)

TOPOLOGY = Path(__file__).resolve().parents[1] / "examples" / "topologies" / "three_tier_skewed.toml"


def summary(plan: Placement) -> dict[str, Any]:
    cost = plan.cost
    return {
        "step_time_s": round(cost.step_time_s, 6),
        "dense_compute_s": round(cost.dense_compute_s, 6),
        "moe_layers_s": round(float(cost.layer_time_s_L.sum()), 6),
        "snapshot_s": round(cost.snapshot_s, 6),
        "units_used": len(set(plan.expert_unit_X.tolist())),
        "bytes_by_tier": {k: round(v / 1e9, 3) for k, v in cost.edges.bytes_by_tier().items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topology", type=Path, default=TOPOLOGY)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--random-seeds", type=int, default=5)
    parser.add_argument("--exponents", type=float, nargs="+", default=[0.0, 0.6, 1.0, 1.2])
    args = parser.parse_args()
    topo = Topology.from_file(args.topology)
    results = []
    for exponent in args.exponents:
        w = Workload(
            n_experts=args.experts,
            n_layers=args.layers,
            top_k=2,
            d_model=4096,
            d_ff=14336,
            tokens_per_step=1 << 20,
            load=zipf_load(args.experts, exponent, seed=0),
            n_dense=8,
            dense_flops_per_step=1e15,
            replicas=1,
        )
        placed, rr = place(topo, w, PlacerConfig(seed=0)), round_robin(topo, w)
        randoms = [random_placement(topo, w, PlacerConfig(seed=s)) for s in range(args.random_seeds)]
        random_median = statistics.median(p.step_time_s for p in randoms)
        results.append(
            {
                "zipf_exponent": exponent,
                "hottest_expert_share": round(float(w.load_LE.max()), 4),
                "placer": summary(placed),
                "round_robin": summary(rr),
                "random_median_step_time_s": round(random_median, 6),
                "ratio_placer_vs_round_robin": round(placed.step_time_s / rr.step_time_s, 4),
                "ratio_placer_vs_random": round(placed.step_time_s / random_median, 4),
            }
        )
    print(
        json.dumps(
            {
                "benchmark": "placer_quality",
                "topology": topo.summary(),
                "experts_per_layer": args.experts,
                "moe_layers": args.layers,
                "workload": "d_model 4096, d_ff 14336, 2^20 tokens/step, top-2, 8 dense units, 1 replica",
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
