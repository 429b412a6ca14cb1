"""How a trickle-checkpointed module's step changes over its first few hundred steps.

``benchmarks/object_store_put.py`` shows that a put into pages of the object store that the process
has not touched before costs several times more than one into pages it has. A unit writes a snapshot
or gradient record after every step, so its first steps pay those page faults and later ones mostly do
not. This script trains benchmarks/recovery.py's model (d_model=512, 4 units, 1,024 tokens per step,
the default ``TrickleCheckpoint``) alone for ``--steps`` steps and prints, per block of 20 steps, the
median step time, the median page faults of all units together and their mean CPU seconds per step.

    python benchmarks/snapshot_warmup.py [--steps 400] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from recovery import _model, _step
from snapshot_cost import _pids, _proc

import zetta_ray as zr

BLOCK = 20


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=8, help="sequences of 128 tokens per step")
    args = parser.parse_args()
    zr.init()
    torch.set_num_threads(2)
    batch = torch.randint(0, 256, (args.batch_size, 129), generator=torch.Generator().manual_seed(0))
    x, y = batch[:, :-1], batch[:, 1:]
    half = zr.SliceRequest(units=4, unit_cpus=0.25)  # as in recovery.py
    dm = zr.parallelize(_model(512), zr.ExpertParallel(degree=4), slice=half)
    rows = []
    try:
        opt = dm.optimizer(torch.optim.AdamW, lr=1e-3)
        units = _pids(dm)["units"]
        for _ in range(args.steps):
            before = [_proc(p) for p in units]
            seconds = _step(dm, opt, x, y)
            after = [_proc(p) for p in units]
            faults = sum(a[0] - b[0] for a, b in zip(after, before, strict=True))
            cpu = sum(a[1] - b[1] for a, b in zip(after, before, strict=True))
            rows.append((seconds, faults, cpu))
    finally:
        dm.close()
    blocks = [
        {
            "first_step": i,
            "step_s": round(statistics.median(r[0] for r in rows[i : i + BLOCK]), 4),
            "unit_faults": int(statistics.median(r[1] for r in rows[i : i + BLOCK])),
            "unit_cpu_s": round(statistics.mean(r[2] for r in rows[i : i + BLOCK]), 3),
        }
        for i in range(0, len(rows), BLOCK)
    ]
    print(
        json.dumps(
            {
                "benchmark": "snapshot_warmup",
                "d_model": 512,
                "units": 4,
                "tokens_per_step": args.batch_size * 128,
                "blocks": blocks,
            }
        )
    )


if __name__ == "__main__":
    main()
