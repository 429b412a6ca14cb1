"""What one trickle snapshot round costs, in CPU, against the floor: one memcpy of the same bytes.

A d_model=512 MoE transformer (the same model as benchmarks/recovery.py) on 4 units trains a few steps;
then the fault manager snapshots every unit ``--rounds`` times in a row (``FaultManager.snapshot(wait=
True)``: each unit writes its state into the object store once, R=2 pools hold it). From /proc, per
round: the CPU seconds and minor page faults of the units, the pools and the controller, and the wall
time. The floor is a plain numpy copy of as many bytes, warm (the same buffers copied again and again)
and cold (into freshly allocated memory), timed in this process. Prints one JSON object.

    python benchmarks/snapshot_cost.py [--rounds 10] [--train-steps 10]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np
import ray
import torch
from recovery import _model, _step

import zetta_ray as zr

TICKS = os.sysconf("SC_CLK_TCK")


def _proc(pid: int) -> tuple[int, float]:
    """(minor page faults, CPU seconds) of process ``pid`` so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[7]), (int(fields[11]) + int(fields[12])) / TICKS


def _copy_ms(nbytes: int, warm: bool, repeats: int = 5) -> float:
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    dst[:] = src  # warm: touched once before timing
    times = []
    for _ in range(repeats):
        if not warm:
            dst = np.empty_like(src)  # fresh pages: faulted in by the copy
        start = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--train-steps", type=int, default=10)
    args = parser.parse_args()
    zr.init()
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 256, (8, 129), generator=g)
    x, y = batch[:, :-1], batch[:, 1:]
    with zr.parallelize(
        _model(512), zr.ExpertParallel(degree=4), slice=zr.SliceRequest(units=4, unit_cpus=0.25)
    ) as dm:
        opt = dm.optimizer(torch.optim.AdamW, lr=1e-3)
        for _ in range(args.train_steps):  # optimizer state exists, object store in use
            _step(dm, opt, x, y)
        runtime, faults = dm._runtime, dm._faults
        units = [p["pid"] for p in runtime.ping()]
        pools = [ray.get(p.stats.remote(), timeout=60)["pid"] for p in faults.pools.values()]
        nbytes = sum(len(np.asarray(a).tobytes()) for a in runtime.state_dict().values()) * 3  # + 2 moments
        groups = {"units": units, "pools": pools, "controller": [os.getpid()]}
        before = {k: [_proc(p) for p in pids] for k, pids in groups.items()}
        start = time.perf_counter()
        for _ in range(args.rounds):
            faults.snapshot(runtime, wait=True)
        wall = (time.perf_counter() - start) / args.rounds
        after = {k: [_proc(p) for p in pids] for k, pids in groups.items()}
    per_round = {
        k: {
            "cpu_s": round(
                sum(a[1] - b[1] for a, b in zip(after[k], before[k], strict=True)) / args.rounds, 4
            ),
            "minor_faults": round(
                sum(a[0] - b[0] for a, b in zip(after[k], before[k], strict=True)) / args.rounds
            ),
        }
        for k in groups
    }
    print(
        json.dumps(
            {
                "benchmark": "snapshot_cost",
                "d_model": 512,
                "units": 4,
                "replicas": faults.config.replicas,
                "rounds": args.rounds,
                "snapshot_bytes_per_round": nbytes,
                "wall_s_per_round": round(wall, 4),
                "per_round": per_round,
                "memcpy_warm_ms": round(_copy_ms(nbytes, warm=True), 1),
                "memcpy_cold_ms": round(_copy_ms(nbytes, warm=False), 1),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
