"""The expert: a two-layer feed-forward network.

Shape legend: N = rows routed to this expert, D = model dim, F = ffn dim
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ExpertFFN"]


class ExpertFFN(nn.Module):
    """``y = W2 gelu(W1 x)``, no biases. One expert of an MoE layer."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, d_ff, bias=False)
        self.w2 = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        return self.w2(F.gelu(self.w1(x_ND)))
