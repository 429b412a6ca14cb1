"""The pipeline bubble of ``zr.PipelineParallel``, measured on the stages, against (P-1)/(M+P-1).

A dense model of ``--blocks`` equal MLP blocks (d_model ``--d-model``, ``--tokens`` tokens per step) is
cut into P stages and trained with M micro-batches on the 1F1B schedule, for every P in ``--stages``
and M in ``--microbatches``. Each stage times its ``run`` call (the step's schedule) and the part of it
spent computing (``busy``); a stage's bubble is the rest, ``1 - busy / run``, and the step's bubble is
the mean over stages. The ideal 1F1B/GPipe bubble with equal stages and free transfers is
``(P - 1) / (M + P - 1)``. One JSON object, one row per (P, M), medians over the measured steps.

Stages share this machine's cores: with more stages than cores the stages also wait for a core, which
reads as bubble here; compare rows with P at most the core count, or run on a machine with P cores.

``--compare-snapshots`` also runs every row without the stages' per-step snapshots (``checkpoint=False``),
in the order on, off, off, on, and each row reports ``step_s``, the training loop's step.

    python benchmarks/pipeline.py [--stages 2 4] [--microbatches 4 8] [--steps 4] [--compare-snapshots]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

import zetta_ray as zr

VOCAB = 512


class Block(torch.nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.mlp = torch.nn.Sequential(
            torch.nn.LayerNorm(d), torch.nn.Linear(d, 4 * d), torch.nn.GELU(), torch.nn.Linear(4 * d, d)
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.mlp(h)


class Head(torch.nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.proj = torch.nn.Linear(d, VOCAB)

    def forward(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(self.proj(h).flatten(0, 1), y.flatten())


class Model(torch.nn.Module):
    """Embedding, equal blocks, a loss head, each a layer of ``pipeline_layers``: stages are near equal in
    layers, and in work but for the cheap embedding and the head."""

    def __init__(self, d: int, blocks: int):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(VOCAB, d)
        self.blocks = torch.nn.ModuleList(Block(d) for _ in range(blocks))
        self.head = Head(d)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h, y)

    def pipeline_layers(self) -> list[torch.nn.Module]:
        return [self.embed, *self.blocks, self.head]


def measure(
    stages: int, microbatches: int, d: int, blocks: int, tokens: int, steps: int, snapshots: bool = True
) -> dict:
    seq = 64
    g = torch.Generator().manual_seed(1)
    x, y = (torch.randint(0, VOCAB, (tokens // seq, seq), generator=g) for _ in range(2))
    strategy = zr.PipelineParallel(stages=stages, microbatches=microbatches)
    runtime = zr.RuntimeConfig(unit_num_cpus=min(1.0, (os.cpu_count() or 1) / stages))
    bubbles, walls, step_walls = [], [], []
    checkpoint = None if snapshots else False  # None: the stages' trickle snapshots, on by default
    with zr.parallelize(Model(d, blocks), strategy, runtime=runtime, checkpoint=checkpoint) as dmodel:
        opt = dmodel.optimizer(torch.optim.AdamW, lr=1e-3)
        for step in range(steps + 1):  # the first step warms up
            start = time.perf_counter()
            opt.zero_grad()
            loss = dmodel(x, y)
            loss.backward()
            opt.step()
            loss.item()
            step_wall = time.perf_counter() - start  # the loop's step (the last step's snapshot waits
            timings = [s["timings"] for s in dmodel.unit_stats()]  # in the next step's forward)
            if step:
                bubbles.append(statistics.mean(1 - t["busy_s"] / t["run_s"] for t in timings))
                walls.append(max(t["run_s"] for t in timings))
                step_walls.append(step_wall)
    ideal = (stages - 1) / (microbatches + stages - 1)
    bubble = statistics.median(bubbles)
    return {
        "stages": stages,
        "microbatches": microbatches,
        "snapshots": snapshots,
        "run_s": round(statistics.median(walls), 4),
        "step_s": round(statistics.median(step_walls), 4),
        "bubble": round(bubble, 3),
        "ideal_bubble": round(ideal, 3),
        "bubble_over_ideal": round(bubble / ideal, 2) if ideal else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--microbatches", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument(
        "--compare-snapshots",
        action="store_true",
        help="each row also without the stages' snapshots (checkpoint=False), in alternating order",
    )
    args = parser.parse_args()
    settings = [True, False, False, True] if args.compare_snapshots else [True]
    rows = [
        measure(p, m, args.d_model, args.blocks, args.tokens, args.steps, snapshots=on)
        for p in args.stages
        for m in args.microbatches
        for on in settings
    ]
    print(
        json.dumps(
            {
                "benchmark": "pipeline_bubble",
                "schedule": "1f1b",
                "d_model": args.d_model,
                "blocks": args.blocks,
                "tokens_per_step": args.tokens,
                "cores": os.cpu_count(),
                "rows": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
