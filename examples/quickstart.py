"""Quickstart: train a tiny Mixture-of-Experts language model whose experts run on Ray actors.

    python examples/quickstart.py            # 10 steps; joins RAY_ADDRESS if set, else starts Ray here

The loop is plain PyTorch. Two lines differ from single-process training: ``zr.parallelize`` moves each
MoE layer's experts onto ``degree`` ComputeUnit actors, and ``dmodel.optimizer`` builds an optimizer whose
``step()`` also steps the experts where they live. Data is the byte-level corpus of the Python standard
library's source (built once into ~/.cache/zetta_ray, then reused), read by a deterministic loader.
"""

from __future__ import annotations

import torch

import zetta_ray as zr
from zetta_ray.data import CorpusSpec, TokenLoader, ensure_corpus


def main(steps: int = 10) -> list[float]:
    cfg = zr.MoEConfig(d_model=64, n_layers=1, n_heads=2, n_experts=4, d_ff=128, seq_len=64)
    corpus = ensure_corpus(CorpusSpec(max_bytes=200_000))
    loader = TokenLoader(corpus, batch_size=8, seq_len=cfg.seq_len, seed=0)

    zr.init()
    torch.manual_seed(0)
    model = zr.MoETransformer(cfg)
    with zr.mesh(expert=2):
        dmodel = zr.parallelize(model, zr.ExpertParallel(degree=2))
    losses = []
    try:
        opt = dmodel.optimizer(torch.optim.AdamW, lr=1e-2)
        for step in range(steps):
            x, y = next(loader)  # (8, 64) int64 byte tokens; y is x shifted by one
            opt.zero_grad()
            logits, loss = dmodel(x, y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            print(f"step {step:2d}  loss {losses[-1]:.3f}")
    finally:
        dmodel.close()
    return losses


if __name__ == "__main__":
    main()
