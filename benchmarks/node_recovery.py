"""Node-failure recovery: how long training stalls when a whole node dies, and how much work is redone.

A local multi-node cluster (``zr.chaos.local_cluster``): a head node (the driver and a MemoryPool) and
two worker nodes of ``--units-per-node`` npu each (default 2), health checks every 0.5 s with 3 misses
allowed. The compute units (2 per worker: 4 units and 3 pools, 7 actors; or 1 per worker: 2 units, 5
actors) train the MoE transformer (d_model=128, 2 layers, 8 experts, top-2, batch 8 x 128 tokens,
AdamW) with trickle snapshots every step on R=2 pools of other nodes. Each trial warms up, then kills
the node of one unit just before a step's forward and times the kill to the end of that step (which
completes only after every unit of the node was detected lost, replaced on a live node, restored and
replayed). Steps redone: the step in progress minus the snapshot
step each replacement restored (target 0, never more than 1). Target: p95 <= 10 s.

The node is killed by SIGKILL of its raylet from a task pinned to it (``zr.chaos.RayletKiller``, the
mechanism ``zetta-ray chaos --address`` uses on a real cluster; the clock starts when the kill is sent)
or by ``cluster.remove_node`` (``--killer remove``). A fresh module per trial, and a fresh worker node
replaces the dead one, so every trial starts from the same layout.

    python benchmarks/node_recovery.py [--kills 5] [--killer raylet|remove] [--units-per-node 2] [--warmup 3]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

import zetta_ray as zr
from zetta_ray.chaos import FAST_HEALTH_CHECKS, ClusterNodeKiller, RayletKiller, local_cluster, node_of_unit

WORKERS = 2


def _model() -> zr.MoETransformer:
    torch.manual_seed(0)
    cfg = zr.MoEConfig(
        vocab_size=256, d_model=128, n_layers=2, n_heads=8, n_experts=8, top_k=2, d_ff=512, seq_len=128
    )
    return zr.MoETransformer(cfg)


def _step(dm, opt, x, y) -> None:
    opt.zero_grad()
    _, loss = dm(x, y)
    loss.backward()
    opt.step()
    loss.item()


def _trial(kill, units: int, unit: int, warmup: int, x, y) -> dict:
    request = zr.SliceRequest(units=units, kind="npu")
    with zr.parallelize(_model(), zr.ExpertParallel(degree=units), slice=request) as dm:
        opt = dm.optimizer(torch.optim.AdamW, lr=1e-3)
        for _ in range(warmup):
            _step(dm, opt, x, y)
        node = node_of_unit(dm, unit)
        lost = [u for u in range(units) if node_of_unit(dm, u) == node]
        step_in_progress = dm.step
        start = time.perf_counter()
        done = kill(node)
        start = done.get("killed_at", start)
        _step(dm, opt, x, y)
        elapsed = time.perf_counter() - start
        events = dm.recoveries
    if sorted(e.unit for e in events) != lost or any(e.kind != "node" for e in events):
        raise RuntimeError(f"expected one node recovery for each of units {lost}, got {events}")
    return {
        "node": node,
        "units_lost": lost,
        "kill_to_next_step_s": round(elapsed, 3),
        "recovery_s": [round(e.recovery_s, 3) for e in events],
        "steps_redone": [step_in_progress - e.restored_step for e in events],
        "actions": sorted({e.action for e in events}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--killer", choices=("raylet", "remove"), default="raylet")
    parser.add_argument("--units-per-node", type=int, choices=(1, 2), default=2)
    parser.add_argument("--warmup", type=int, default=3, help="steps before each kill")
    parser.add_argument(
        "--ray-health-checks",
        action="store_true",
        help="Ray's default health checks (a dead node is declared dead after ~15 s) instead of fast ones",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 256, (8, 129), generator=g)
    x, y = batch[:, :-1], batch[:, 1:]
    per = args.units_per_node
    units = WORKERS * per
    npu = {"npu": per}
    trials = []
    checks = None if args.ray_health_checks else FAST_HEALTH_CHECKS
    with local_cluster(WORKERS, units=npu, cpus_per_worker=per, system_config=checks) as cluster:
        kill = RayletKiller() if args.killer == "raylet" else ClusterNodeKiller(cluster)
        for k in range(args.kills):
            trials.append(_trial(kill, units, k % units, args.warmup, x, y))
            print(json.dumps({"trial": k, **trials[-1]}), flush=True)
            dead = [n for n in cluster.worker_nodes if n.node_id == trials[-1]["node"]]
            for n in dead:  # a raylet SIGKILL leaves the node in the cluster's list: forget it
                cluster.remove_node(n, allow_graceful=False)
            cluster.add_node(num_cpus=per, resources=npu)
            cluster.wait_for_nodes(timeout=60)
    times = [t["kill_to_next_step_s"] for t in trials]
    redone = [r for t in trials for r in t["steps_redone"]]
    summary = {
        "benchmark": "recovery_time_node",
        "killer": "SIGKILL of the node's raylet" if args.killer == "raylet" else "cluster.remove_node",
        "health_checks": checks or "Ray's defaults",
        "nodes": f"head + {WORKERS} workers of {per} npu",
        "units": units,
        "units_per_node": per,
        "d_model": 128,
        "kills": args.kills,
        "kill_to_next_step_p50_s": round(float(np.percentile(times, 50)), 3),
        "kill_to_next_step_p95_s": round(float(np.percentile(times, 95)), 3),
        "kill_to_next_step_s": times,
        "steps_redone_max": max(redone),
        "steps_redone": redone,
    }
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
