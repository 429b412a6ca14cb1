"""A decoder-only MoE transformer language model, readable top to bottom.

    idx -> token + position embeddings -> n_layers x Block -> final LayerNorm -> tied head -> logits

Each Block is pre-norm: ``x + attn(ln1(x))`` then ``x + moe(ln2(x))``. The loss is next-token
cross-entropy plus ``aux_loss_coef`` times the mean of the MoE layers' auxiliary losses.

Shape legend: B = batch, S = sequence, D = model dim, H = heads, V = vocabulary
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zetta_ray.config import MoEConfig
from zetta_ray.experts.moe import MoELayer

__all__ = ["MoETransformer"]


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        B, S, D = x_BSD.shape
        q, k, v = self.qkv(x_BSD).split(D, dim=-1)
        q, k, v = (t.view(B, S, self.n_heads, D // self.n_heads).transpose(1, 2) for t in (q, k, v))
        o_BHSd = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(o_BHSd.transpose(1, 2).reshape(B, S, D))


class Block(nn.Module):
    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.moe = MoELayer(
            cfg.d_model, cfg.d_ff, cfg.n_experts, cfg.top_k, cfg.capacity_factor, cfg.z_loss_coef
        )

    def forward(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_BSD = x_BSD + self.attn(self.ln1(x_BSD))
        y_BSD, aux = self.moe(self.ln2(x_BSD))
        return x_BSD + y_BSD, aux


class MoETransformer(nn.Module):
    """``logits, loss = model(idx, targets)``; ``targets=None`` gives ``loss=None``."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # tied
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)

    def forward(
        self, idx_BS: torch.Tensor, targets_BS: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, S = idx_BS.shape
        if self.cfg.seq_len < S:
            raise ValueError(
                f"sequence length {S} exceeds MoEConfig.seq_len={self.cfg.seq_len}; "
                "crop the input or build the model with a larger seq_len"
            )
        pos_S = torch.arange(S, device=idx_BS.device)
        x_BSD = self.tok_emb(idx_BS) + self.pos_emb(pos_S)
        aux_total = x_BSD.new_zeros(())
        for block in self.blocks:
            x_BSD, aux = block(x_BSD)
            aux_total = aux_total + aux
        logits_BSV = self.lm_head(self.ln_f(x_BSD))
        if targets_BS is None:
            return logits_BSV, None
        ce = F.cross_entropy(logits_BSV.reshape(B * S, -1), targets_BS.reshape(B * S))
        loss = ce + self.cfg.aux_loss_coef * aux_total / len(self.blocks)
        return logits_BSV, loss
