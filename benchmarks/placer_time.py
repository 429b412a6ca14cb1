"""Placer wall time for 1,024 experts on synthetic three-tier machines of about 1k, 10k and 100k units.

Prints one JSON object: per machine size, the median (and all) wall times of ``zr placement.place`` over
a few runs, plus the time to build the topology. Target (issue 3): <= 10 s at 100k units.

    python benchmarks/placer_time.py [--sizes 1000 10000 100000] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from typing import Any

from zetta_ray.placement import PlacerConfig, Topology, Workload, place, zipf_load

UNITS_PER_POD = 1024  # 16 racks x 8 nodes x 8 units


def synthetic_spec(n_units: int) -> dict[str, Any]:
    """A skewed three-tier machine of about ``n_units`` units: pods of 16 racks of 8 nodes of 8 units,
    each pod with one GPU rack, nine racks of new NPUs and six of old ones."""
    pods = max(1, round(n_units / UNITS_PER_POD))

    def node(kind: str, flops: str, memory: str) -> dict[str, Any]:
        return {
            "units": [{"kind": kind, "count": 8, "flops": flops, "memory": memory}],
            "pools": [{"memory": "1TiB", "bandwidth": "100GB/s"}],
        }

    return {
        "name": f"synthetic-{pods * UNITS_PER_POD}",
        "links": {"fabric": {"bandwidth": "3GB/s", "latency": "30us"}},
        "node_types": {
            "gpu8": node("gpu", "1000T", "80GiB"),
            "npu8_new": node("npu", "400T", "64GiB"),
            "npu8_old": node("npu", "150T", "32GiB"),
        },
        "pods": [
            {
                "count": pods,
                "racks": [
                    {"nodes": [{"type": "gpu8", "count": 8}]},
                    {"count": 9, "nodes": [{"type": "npu8_new", "count": 8}]},
                    {"count": 6, "nodes": [{"type": "npu8_old", "count": 8}]},
                ],
            }
        ],
    }


def workload() -> Workload:
    """1,024 experts of a d_model 4096 / d_ff 14336 MoE layer, Zipf(1.0) load, 16 dense units."""
    return Workload(
        n_experts=1024,
        d_model=4096,
        d_ff=14336,
        tokens_per_step=1 << 20,
        load=zipf_load(1024, 1.0, seed=0),
        n_dense=16,
        dense_flops_per_step=2e16,
        replicas=1,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    w = workload()
    results = []
    for size in args.sizes:
        t0 = time.perf_counter()
        topo = Topology.from_spec(synthetic_spec(size))
        build_s = time.perf_counter() - t0
        times, plan = [], None
        for _ in range(args.runs):
            t0 = time.perf_counter()
            plan = place(topo, w, PlacerConfig(seed=0))
            times.append(time.perf_counter() - t0)
        results.append(
            {
                "units": topo.n_units,
                "nodes": topo.n_nodes,
                "racks": topo.n_racks,
                "pods": topo.n_pods,
                "topology_build_s": round(build_s, 4),
                "place_median_s": round(statistics.median(times), 4),
                "place_runs_s": [round(x, 4) for x in times],
                "predicted_step_time_s": round(plan.step_time_s, 6),
            }
        )
    print(
        json.dumps(
            {
                "benchmark": "placer_time",
                "experts": w.total_experts,
                "n_dense": w.n_dense,
                "replicas": w.replicas,
                "runs": args.runs,
                "machine": {
                    "python": platform.python_version(),
                    "cpu": platform.processor() or platform.machine(),
                },
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
