"""Time to plan the 10T-parameter MoE of ``examples/sim/moe_10t.toml`` at 1k, 100k and 1M units (JSON).

    python benchmarks/sim_plan_time.py [--units 1000 100000 1000000] [--spec PATH]

Each row is one ``zetta_ray.sim.simulate`` call with ``parallel = "auto"``: the mesh search, the step
model, the optical-circuit comparison, the expert placement on the placement layer's topology of the
whole machine, and the goodput table. A machine too small to hold the model is a row with
``fits: false`` and the simulator's reason, timed like the others.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

from zetta_ray.sim import DoesNotFitError, simulate

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SPEC = Path(__file__).resolve().parents[1] / "examples" / "sim" / "moe_10t.toml"


def plan(raw: dict, units: int) -> dict:
    raw = {**raw, "hardware": {**raw["hardware"], "units": units}}
    started = time.perf_counter()
    try:
        result = simulate(raw)
    except DoesNotFitError as e:
        return {"units": units, "seconds": time.perf_counter() - started, "fits": False, "reason": str(e)}
    mesh = result["mesh"]
    return {
        "units": units,
        "seconds": time.perf_counter() - started,
        "fits": True,
        "search_seconds": mesh["search"]["seconds"],
        "meshes_tried": mesh["search"]["evaluated"],
        "mesh": {k: mesh[k] for k in ("tp", "pp", "dp", "ep", "virtual_stages", "micro_batch", "recompute")},
        "units_used": mesh["units_used"],
        "step_time_s": result["step_time_s"],
        "mfu": result["mfu"],
        "tokens_per_s": result["tokens_per_s"],
        "memory_per_unit_gb": result["memory_per_unit_bytes"] / 1e9,
        "goodput": result.get("goodput"),
        "optical_speedup": result["optical"]["speedup"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", type=int, nargs="+", default=[1_000, 100_000, 1_000_000])
    parser.add_argument("--spec", type=Path, default=SPEC)
    args = parser.parse_args()
    raw = tomllib.loads(args.spec.read_text())
    rows = [plan(raw, n) for n in args.units]
    out = {
        "benchmark": "sim_plan_time",
        "spec": str(args.spec.name),
        "machine": {
            "python": platform.python_version(),
            "processor": platform.processor() or platform.machine(),
        },
        "rows": rows,
    }
    sys.stdout.write(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
