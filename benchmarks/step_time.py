"""One MoE layer's training step: plain single-process PyTorch against zetta_ray with one actor per expert.

Same machine, same run, same data: 8 experts, top-2, 4096 tokens per step, AdamW. Plain PyTorch uses
``--threads`` torch threads (2 = all cores here); zetta_ray runs each expert in its own ComputeUnit actor
with one thread, twice: the runtime alone (``checkpoint=False``; ``ratio``) and with the default
per-step trickle snapshots (``ratio_with_snapshots``; their own cost is benchmarks/recovery.py's
subject). Prints one JSON object per model size with the median step times after warm-up and the
ratios (zetta_ray / plain; lower is better, 1.0 means no overhead).

    python benchmarks/step_time.py [--steps 3] [--warmup 1] [--rounds 9]

Rounds rotate which side goes first (so use a multiple of 3), so that a block's place in the round
favours no side: benchmarks/recovery.py read higher in a fixed order than with the order alternated
(BENCHMARKS.md, issue-4 section).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import zetta_ray as zr

TOKENS = 4096
N_EXPERTS = 8
TOP_K = 2


class OneMoELayer(torch.nn.Module):
    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.moe = zr.MoELayer(d_model, d_ff, N_EXPERTS, TOP_K)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        y_BSD, aux = self.moe(x_BSD)
        return y_BSD.square().mean() + 0.01 * aux


def _time_steps(model, opt, x, n: int) -> list[float]:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        opt.zero_grad()
        loss = model(x)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return times


def measure(
    d_model: int, d_ff: int, steps: int, warmup: int, rounds: int, threads: int, first_warmup: int = 2
) -> dict:
    torch.manual_seed(0)
    x = torch.randn(1, TOKENS, d_model)
    plain = OneMoELayer(d_model, d_ff)
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=1e-3)
    modules = {}
    share = zr.SliceRequest(units=N_EXPERTS, unit_cpus=0.125)  # both modules live at once on 2 CPUs
    try:
        for name, checkpoint in (("runtime_only", False), ("with_snapshots", None)):
            torch.manual_seed(0)
            dmodel = zr.parallelize(
                OneMoELayer(d_model, d_ff),
                zr.ExpertParallel(degree=N_EXPERTS),
                slice=share,
                checkpoint=checkpoint,
            )
            modules[name] = (dmodel, dmodel.optimizer(torch.optim.AdamW, lr=1e-3))
        sides = {"plain": (plain, plain_opt), **modules}
        order = list(sides)
        times: dict[str, list[float]] = {name: [] for name in sides}
        # Short interleaved blocks, so that drift on a shared machine hits every side alike, in an order
        # that rotates every round: a block's place in the round (first, or after another side's) must
        # not favour one side.
        for r in range(rounds):
            skip = first_warmup if r == 0 else warmup
            for name in order[r % len(order) :] + order[: r % len(order)]:
                torch.set_num_threads(threads)
                model, opt = sides[name]
                times[name] += _time_steps(model, opt, x, skip + steps)[skip:]
    finally:
        for dmodel, _ in modules.values():
            dmodel.close()
    med = {name: statistics.median(t) for name, t in times.items()}
    return {
        "benchmark": "step_time",
        "d_model": d_model,
        "d_ff": d_ff,
        "experts": N_EXPERTS,
        "top_k": TOP_K,
        "tokens_per_step": TOKENS,
        "plain_threads": threads,
        "steps_measured": len(times["plain"]),
        "plain_median_s": round(med["plain"], 4),
        "zetta_ray_median_s": round(med["runtime_only"], 4),
        "ratio": round(med["runtime_only"] / med["plain"], 3),
        "zetta_ray_with_snapshots_median_s": round(med["with_snapshots"], 4),
        "ratio_with_snapshots": round(med["with_snapshots"] / med["plain"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=3, help="measured steps per side per round")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured steps at a round's start")
    parser.add_argument("--first-warmup", type=int, default=2, help="unmeasured steps of the first round")
    parser.add_argument("--rounds", type=int, default=9, help="a multiple of 3: each side leads as often")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    zr.init()
    for d_model, d_ff in ((512, 2048), (256, 1024)):
        print(
            json.dumps(
                measure(d_model, d_ff, args.steps, args.warmup, args.rounds, args.threads, args.first_warmup)
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
