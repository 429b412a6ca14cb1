"""Trickle checkpointing's cost and recovery's speed.

1. Overhead: the same MoE training step with a snapshot of every unit after every step
   (``TrickleCheckpoint(every=1)``: the full state every ``--full-every`` steps, default 8, gradient
   records between) against none (``checkpoint=False``), same run, interleaved rounds, median after
   warm-up; the ratio is the overhead (target <= 1.03 at d_model=512). The median is a step with a
   record; ``mean_ratio`` counts the full snapshots' steps too (their share of the time). Rounds alternate
   which module goes first. ``--control`` adds an A/A run (snapshots off on both sides) after each
   one: on a shared machine a single ratio moves by a few percent with no change at all. A snapshot costs
   about the same at any batch size (it copies the units' state), while a step's work grows with its
   tokens, so the overhead is reported at several batch sizes (``--batches``).
2. Recovery: a unit actor is killed at a step; the time from the kill to the end of the next completed
   step, p50 and p95 over ``--kills`` kills (target <= 5 s), and the steps redone (snapshot step vs the
   step in progress; target 0, never more than 1).

``--cluster`` runs the overhead part on a local cluster instead (``zr.chaos.local_cluster``: a head node
and two worker nodes of 4 npu each, 3 GiB object stores; one module's units on each worker): each
snapshot then goes to R=2 pools on the other two nodes through the object store, as on a real cluster,
but every node shares this machine's cores, so the transfers between nodes cost CPU that the training
steps would otherwise have.

    python benchmarks/recovery.py [--steps 4] [--rounds 6] [--warmup 1] [--kills 5] [--batches 8 64]
                                  [--control] [--overhead-only] [--fixed-order] [--full-every 8]
                                  [--cluster] [--replicas 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import ray
import torch

import zetta_ray as zr
from zetta_ray.chaos import local_cluster


def _model(d_model: int) -> zr.MoETransformer:
    torch.manual_seed(0)
    cfg = zr.MoEConfig(
        vocab_size=256,
        d_model=d_model,
        n_layers=2,
        n_heads=8,
        n_experts=8,
        top_k=2,
        d_ff=4 * d_model,
        seq_len=128,
    )
    return zr.MoETransformer(cfg)


def _step(dm, opt, x, y) -> float:
    start = time.perf_counter()
    opt.zero_grad()
    _, loss = dm(x, y)
    loss.backward()
    opt.step()
    loss.item()
    return time.perf_counter() - start


def overhead(
    d_model: int,
    steps: int,
    warmup: int,
    rounds: int,
    batch_size: int = 8,
    first_warmup: int = 4,
    control: bool = False,
    fixed_order: bool = False,
    full_every: int | None = None,
    request: zr.SliceRequest | None = None,
    replicas: int | None = None,
) -> dict:
    """The snapshot module's median step time over the other's. Rounds alternate which module goes
    first (ABBA), so that whatever the first or second block of a round suffers hits both alike.
    ``control`` runs the same measurement with snapshots off on both sides (an A/A test): its ratio's
    distance from 1 is what this machine's noise alone gives. ``fixed_order``: the module without
    snapshots always goes first, as this script did until 2026-11-30 (to reproduce that bias)."""
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 256, (batch_size, 129), generator=g)
    x, y = batch[:, :-1], batch[:, 1:]
    runs = {}
    # both modules live at once on a 2-CPU machine
    half = request or zr.SliceRequest(units=4, unit_cpus=0.25)
    # the default, a snapshot after every step (records between full ones; full_every=1: full only)
    options = {"full_every": full_every, "replicas": replicas}
    config = zr.TrickleCheckpoint(**{k: v for k, v in options.items() if v is not None})
    snapshots = False if control else config
    mods = {
        "none": zr.parallelize(_model(d_model), zr.ExpertParallel(degree=4), slice=half, checkpoint=False),
        "every_step": zr.parallelize(
            _model(d_model), zr.ExpertParallel(degree=4), slice=half, checkpoint=snapshots
        ),
    }
    manager = mods["every_step"].faults
    layout = [  # each unit's node and its snapshots' pools' nodes (8 hex digits each)
        [node[:8], [n[:8] for _, n in manager.replica_targets(u)]]
        for u, node in enumerate(manager.unit_nodes if manager else [])
    ]
    try:
        opts = {k: m.optimizer(torch.optim.AdamW, lr=1e-3) for k, m in mods.items()}
        for r in range(rounds):  # short interleaved blocks: drift on a shared machine hits both alike
            skip = first_warmup if r == 0 else warmup  # a block's first steps may carry the other's spill
            for k in list(mods) if r % 2 == 0 or fixed_order else list(mods)[::-1]:
                times = [_step(mods[k], opts[k], x, y) for _ in range(skip + steps)]
                runs.setdefault(k, []).extend(times[skip:])
    finally:
        for m in mods.values():
            m.close()
    none, every = statistics.median(runs["none"]), statistics.median(runs["every_step"])
    mean = statistics.mean(runs["every_step"]) / statistics.mean(runs["none"])
    return {
        "benchmark": "snapshot_overhead_control" if control else "snapshot_overhead",
        "d_model": d_model,
        "units": 4,
        "tokens_per_step": batch_size * 128,
        "steps_measured": len(runs["none"]),
        "no_snapshot_median_s": round(none, 4),
        "snapshot_every_step_median_s" if not control else "second_no_snapshot_median_s": round(every, 4),
        "ratio": round(every / none, 3),
        "mean_ratio": round(mean, 3),
        "full_every": None if control else config.full_every,
        "replicas": None if control else config.replicas,
        "unit_node_and_replica_nodes": layout,
    }


def recovery(kills: int) -> dict:
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 256, (8, 129), generator=g)
    x, y = batch[:, :-1], batch[:, 1:]
    times, redone = [], []
    with zr.parallelize(_model(128), zr.ExpertParallel(degree=4)) as dm:
        opt = dm.optimizer(torch.optim.AdamW, lr=1e-3)
        for _ in range(3):
            _step(dm, opt, x, y)
        for k in range(kills):
            for _ in range(2):
                _step(dm, opt, x, y)
            step_in_progress = dm.step
            start = time.perf_counter()
            ray.kill(dm.unit_handle(k % 4), no_restart=True)
            _step(dm, opt, x, y)
            times.append(time.perf_counter() - start)
            event = dm.recoveries[-1]
            redone.append(step_in_progress - event.restored_step)
    return {
        "benchmark": "recovery_time_actor",
        "kills": kills,
        "kill_to_next_step_p50_s": round(float(np.percentile(times, 50)), 3),
        "kill_to_next_step_p95_s": round(float(np.percentile(times, 95)), 3),
        "steps_redone_max": int(max(redone)),
        "steps_redone": redone,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=4, help="measured steps per module per round")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured steps at a round's start")
    parser.add_argument("--first-warmup", type=int, default=4, help="unmeasured steps of the first round")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument(
        "--batches",
        type=int,
        nargs="+",
        default=[8, 64],
        help="batch sizes (sequences of 128 tokens) for the d_model=512 overhead runs",
    )
    parser.add_argument(
        "--control",
        action="store_true",
        help="after each d_model=512 overhead run, the same run with snapshots off on both sides (A/A)",
    )
    parser.add_argument("--overhead-only", action="store_true", help="d_model=512 overhead runs only")
    parser.add_argument(
        "--fixed-order", action="store_true", help="no snapshots first in every round (the old, biased way)"
    )
    parser.add_argument(
        "--full-every", type=int, default=None, help="TrickleCheckpoint(full_every=...); default: its default"
    )
    parser.add_argument(
        "--replicas", type=int, default=None, help="TrickleCheckpoint(replicas=...); default: its default"
    )
    parser.add_argument(
        "--cluster",
        action="store_true",
        help="the d_model=512 overhead runs on a local cluster (head + 2 worker nodes of 4 npu each, 3 GiB "
        "object stores): R=2 replicas on the nodes other than a unit's, through the object store",
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.cluster:
        store = 3 << 30  # per node; cluster_utils' 150 MiB default would spill the snapshots to disk
        with local_cluster(
            2, units={"npu": 4}, cpus_per_worker=2, system_config=None, object_store_bytes=store
        ):
            _overhead_runs(args, zr.SliceRequest(units=4, kind="npu"))
        return
    zr.init()
    _overhead_runs(args)
    if args.overhead_only:
        return
    print(json.dumps(overhead(256, args.steps, args.warmup, args.rounds, 8, args.first_warmup)), flush=True)
    print(json.dumps(recovery(args.kills)), flush=True)


def _overhead_runs(args: argparse.Namespace, request: zr.SliceRequest | None = None) -> None:
    for batch_size in args.batches:
        for control in (False, True) if args.control else (False,):
            result = overhead(
                512,
                args.steps,
                args.warmup,
                args.rounds,
                batch_size,
                args.first_warmup,
                control,
                args.fixed_order,
                args.full_every,
                request,
                args.replicas,
            )
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
