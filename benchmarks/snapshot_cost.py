"""What a trickle snapshot after every step costs a training step, in CPU, by process.

Two copies of the same d_model=512 MoE transformer (benchmarks/recovery.py's model, 4 units each) train
side by side, one with a snapshot of every unit after every step (the default) and one with
``checkpoint=False``, in interleaved blocks of steps. For each measured step the script reads, from
/proc, the CPU seconds (nanosecond run times of each thread) and minor page faults of that module's
units, its MemoryPool actors, the controller and the node's raylet (which hosts the object store),
after a short pause so that the snapshot's asynchronous work (the units' write into the
object store, the pools' puts) is counted in the step that caused it. The snapshot's cost is the
difference of the medians, in CPU seconds per step and as a share of the step's CPU (the median step
carries a gradient record; ``mean_share_of_step_cpu`` counts the full snapshots' steps too); the
floor is a plain warm memcpy of a full snapshot's bytes, timed here.

CPU seconds drift less than wall time on a shared machine, and on a machine whose cores are all busy
training (2 cores here), extra CPU is extra step time: the share is the overhead to expect, which
benchmarks/recovery.py measures directly as a wall-time ratio.

``--cluster``: the two modules on a local cluster instead (benchmarks/recovery.py ``--cluster``: head
and two worker nodes of 4 npu, one module's units on each worker, R=2 replicas on the two nodes other
than a unit's). ``raylet`` then counts every node's raylet (each hosts its node's object store and moves
objects between nodes) for both modules alike.

    python benchmarks/snapshot_cost.py [--batch-size 8] [--rounds 3] [--steps 6] [--warmup 4] [--cluster]
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
from zetta_ray.chaos import local_cluster

GROUPS = ("units", "pools", "controller", "raylet")
PAUSE_S = 0.3  # after each step: the snapshot's asynchronous work finishes inside the measured window


def _stat(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command name (which may itself hold spaces and
    parentheses): field 1 is the parent's pid, 7 the minor page faults."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def _proc(pid: int) -> tuple[int, float]:
    """(minor page faults, CPU seconds) of process ``pid`` so far. The CPU time is the sum of its live
    threads' nanosecond run times (/proc/PID/task/*/schedstat): /proc/PID/stat counts in 10 ms ticks,
    too coarse for a few milliseconds per step."""
    fields = _stat(pid)
    ns = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                ns += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):  # the thread ended between listdir and open
            pass
    return int(fields[7]), ns / 1e9


def _copy_ms(nbytes: int, repeats: int = 5) -> float:
    """A warm memcpy of ``nbytes``: the same buffers copied again and again."""
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    dst[:] = src
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _pids(dm: zr.DistributedModule) -> dict[str, list[int]]:
    pools = dm.faults.pools.values() if dm.faults is not None else []
    units = [p["pid"] for p in dm.unit_stats()]
    pools = [ray.get(p.stats.remote(), timeout=60)["pid"] for p in pools]
    raylets = sorted({int(_stat(pid)[1]) for pid in units + pools})  # a worker's parent: its raylet
    return {"units": units, "raylet": raylets, "pools": pools, "controller": [os.getpid()]}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch-size", type=int, default=8, help="sequences of 128 tokens per step")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6, help="measured steps per module per round")
    parser.add_argument("--warmup", type=int, default=4, help="unmeasured steps at the start of a round")
    parser.add_argument("--cluster", action="store_true", help="on a local three-node cluster (see above)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.cluster:
        with local_cluster(
            2, units={"npu": 4}, cpus_per_worker=2, system_config=None, object_store_bytes=3 << 30
        ):
            _measure(args, zr.SliceRequest(units=4, kind="npu"))
    else:
        zr.init()
        _measure(args, zr.SliceRequest(units=4, unit_cpus=0.25))  # both modules live at once on 2 CPUs


def _measure(args: argparse.Namespace, half: zr.SliceRequest) -> None:
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 256, (args.batch_size, 129), generator=g)
    x, y = batch[:, :-1], batch[:, 1:]
    mods = {
        "none": zr.parallelize(_model(512), zr.ExpertParallel(degree=4), slice=half, checkpoint=False),
        "every_step": zr.parallelize(_model(512), zr.ExpertParallel(degree=4), slice=half),
    }
    samples: dict[str, dict[str, list[float]]] = {k: {} for k in mods}
    try:
        opts = {k: m.optimizer(torch.optim.AdamW, lr=1e-3) for k, m in mods.items()}
        pids = {k: _pids(m) for k, m in mods.items()}
        raylets = sorted({r for p in pids.values() for r in p["raylet"]})
        for p in pids.values():  # on a cluster every node's raylet works for the snapshots: count all
            p["raylet"] = raylets
        nbytes = sum(a.nbytes for a in mods["none"].runtime.state_dict().values()) * 3  # + 2 moments
        for _ in range(args.rounds):
            for k, m in mods.items():
                for i in range(args.warmup + args.steps):
                    before = {group: [_proc(p) for p in ps] for group, ps in pids[k].items()}
                    wall = _step(m, opts[k], x, y)
                    time.sleep(PAUSE_S)
                    after = {group: [_proc(p) for p in ps] for group, ps in pids[k].items()}
                    if i < args.warmup:
                        continue
                    s = samples[k]
                    s.setdefault("wall_s", []).append(wall)
                    for group in before:
                        pairs = list(zip(after[group], before[group], strict=True))
                        s.setdefault(f"{group}_cpu_s", []).append(sum(a[1] - b[1] for a, b in pairs))
                        s.setdefault(f"{group}_faults", []).append(sum(a[0] - b[0] for a, b in pairs))
    finally:
        for m in mods.values():
            m.close()
    for s in samples.values():
        s["total_cpu_s"] = [sum(c) for c in zip(*(s[f"{g}_cpu_s"] for g in GROUPS), strict=True)]
    med = {k: {name: statistics.median(v) for name, v in s.items()} for k, s in samples.items()}
    mean_cpu = {k: statistics.mean(s["total_cpu_s"]) for k, s in samples.items()}
    extra = {
        name: round(med["every_step"][name] - med["none"][name], 4)
        for name in med["none"]
        if name.endswith("cpu_s") or name.endswith("faults")
    }
    print(
        json.dumps(
            {
                "benchmark": "snapshot_cost",
                "d_model": 512,
                "units": 4,
                "nodes": "head + 2 workers (local cluster)" if args.cluster else "one",
                "raylets": len(pids["none"]["raylet"]),
                "tokens_per_step": args.batch_size * 128,
                "steps_measured": len(samples["none"]["wall_s"]),
                "full_snapshot_bytes": nbytes,
                "gradient_record_bytes": nbytes // 3,
                "median_per_step": {k: {n: round(v, 4) for n, v in m.items()} for k, m in med.items()},
                "snapshot_extra_per_step": extra,
                "snapshot_share_of_step_cpu": round(extra["total_cpu_s"] / med["none"]["total_cpu_s"], 4),
                "mean_share_of_step_cpu": round(mean_cpu["every_step"] / mean_cpu["none"] - 1, 4),
                "memcpy_warm_ms": round(_copy_ms(nbytes), 1),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
