"""A dense model's training step: plain single-process PyTorch against ``zr.DataParallel(degree=2)``.

Same machine, same run, same data: a dense transformer-style language model (``--d-model``, 4 blocks of
LayerNorm + MLP, vocab 4096, ``--tokens`` tokens per step), AdamW. Plain PyTorch uses ``--threads``
torch threads (2 = all cores here); zetta_ray runs two DenseReplica actors of one thread each, each on
half of the batch, their gradient buckets exchanged through the object store during backward.

What it reports, as one JSON object (medians over the measured steps, rounds rotating who goes first):

- ``ratio``: zetta_ray's step time / plain PyTorch's on the same cores (both sides use every core);
- ``controller_cpu_ratio``: this process's CPU seconds per zetta_ray step (splitting the batch,
  submitting the calls, reading the loss; Ray's threads in this process included) / plain PyTorch's
  CPU seconds per step: the issue's goal is <= 0.05;
- from the replicas (``DenseReplica.timings``): backward time, the bucket exchange (first bucket out to
  the last copy in), the part of it exposed after backward ended, and ``overlap``: the fraction of the
  exchange hidden behind backward, ``1 - exposed / exchange``.

    python benchmarks/data_parallel.py [--d-model 512] [--tokens 4096] [--steps 4] [--rounds 4]
"""

from __future__ import annotations

import json
import statistics

import torch
from steps import rotate, step_parser

import zetta_ray as zr

VOCAB = 4096
BLOCKS = 4


class DenseLM(torch.nn.Module):
    """A dense language model: embedding, ``BLOCKS`` pre-norm MLP blocks, a head; ``(logits, loss)``."""

    def __init__(self, d_model: int):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(VOCAB, d_model)
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(
                torch.nn.LayerNorm(d_model),
                torch.nn.Linear(d_model, 4 * d_model),
                torch.nn.GELU(),
                torch.nn.Linear(4 * d_model, d_model),
            )
            for _ in range(BLOCKS)
        )
        self.norm = torch.nn.LayerNorm(d_model)
        self.head = torch.nn.Linear(d_model, VOCAB)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.embed(x)
        for block in self.blocks:
            h = h + block(h)
        logits = self.head(self.norm(h))
        return logits, torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())


def measure(d_model: int, tokens: int, steps: int, warmup: int, rounds: int, threads: int) -> dict:
    seq = 128
    batch = tokens // seq
    g = torch.Generator().manual_seed(1)
    x, y = (torch.randint(0, VOCAB, (batch, seq), generator=g) for _ in range(2))
    plain = DenseLM(d_model)
    sides = {"plain": (plain, torch.optim.AdamW(plain.parameters(), lr=1e-3))}
    dmodel = zr.parallelize(
        DenseLM(d_model),
        zr.DataParallel(degree=2),
        runtime=zr.RuntimeConfig(unit_num_cpus=0.5),  # both sides share the machine's cores
    )
    timings: list[dict[str, float]] = []

    def read_timings(name: str) -> None:
        if name == "zetta_ray":
            timings.extend(s["timings"] for s in dmodel.unit_stats())

    try:
        sides["zetta_ray"] = (dmodel, dmodel.optimizer(torch.optim.AdamW, lr=1e-3))
        walls, cpus = rotate(
            sides, x, y, rounds=rounds, warmup=warmup, steps=steps, threads=threads, after=read_timings
        )
    finally:
        dmodel.close()
    med = {k: statistics.median(v) for k, v in walls.items()}
    cpu = {k: statistics.median(v) for k, v in cpus.items()}

    def replica(key: str) -> float:
        return round(statistics.median(t[key] for t in timings), 4)

    exchange, exposed = replica("exchange_s"), replica("exposed_s")
    return {
        "benchmark": "data_parallel",
        "d_model": d_model,
        "blocks": BLOCKS,
        "tokens_per_step": tokens,
        "replicas": 2,
        "parameters": sum(p.numel() for p in plain.parameters()),
        "plain_threads": threads,
        "steps_measured": len(walls["plain"]),
        "plain_median_s": round(med["plain"], 4),
        "zetta_ray_median_s": round(med["zetta_ray"], 4),
        "ratio": round(med["zetta_ray"] / med["plain"], 3),
        "plain_cpu_s_per_step": round(cpu["plain"], 4),
        "controller_cpu_s_per_step": round(cpu["zetta_ray"], 4),
        "controller_cpu_ratio": round(cpu["zetta_ray"] / cpu["plain"], 4),
        "controller_cpu_s_per_step_per_unit": round(cpu["zetta_ray"] / 2, 4),
        "replica_backward_s": replica("backward_s"),
        "replica_reduce_wait_s": replica("reduce_wait_s"),
        "exchange_s": exchange,
        "exposed_s": exposed,
        "overlap": round(1 - exposed / exchange, 3) if exchange > 0 else None,
    }


def main() -> None:
    args = step_parser(__doc__, tokens=4096, steps=4).parse_args()
    print(json.dumps(measure(args.d_model, args.tokens, args.steps, args.warmup, args.rounds, args.threads)))


if __name__ == "__main__":
    main()
