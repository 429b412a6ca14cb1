"""Top-k softmax routing, capacity-factor token dropping and the router's auxiliary losses.

Shape legend (suffixes on tensor names):
    T = tokens, D = model dim, E = experts, K = top-k, A = assignments (T * K), N = kept assignments
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["Routing", "capacity", "load_balancing_loss", "route", "router_z_loss"]


@dataclass(frozen=True, slots=True)
class Routing:
    """Where each token goes.

    ``weight_TK`` carries the gradient back into the router; ``keep_TK`` is False for an assignment that
    capacity dropped (the token then receives nothing from that expert and passes on by the residual).
    """

    expert_TK: torch.Tensor
    weight_TK: torch.Tensor
    keep_TK: torch.Tensor
    probs_TE: torch.Tensor
    logits_TE: torch.Tensor


def capacity(n_tokens: int, n_experts: int, top_k: int, capacity_factor: float | None) -> int | None:
    """Rows each expert may take: ``ceil(capacity_factor * T * K / E)``, or None when dropless."""
    if capacity_factor is None:
        return None
    return math.ceil(capacity_factor * n_tokens * top_k / n_experts)


def route(logits_TE: torch.Tensor, top_k: int, capacity_factor: float | None = None) -> Routing:
    """Pick the ``top_k`` experts of every token by softmax probability.

    The weights are the softmax probabilities of the chosen experts, not renormalised, so top-1 routing
    still trains the router through the main loss (as in Switch Transformer). With a capacity factor,
    assignments are served in priority order: all first choices by token position, then all second
    choices, and so on (GShard); an assignment past its expert's capacity is dropped.
    """
    T, E = logits_TE.shape
    probs_TE = torch.softmax(logits_TE.float(), dim=-1)
    weight_TK, expert_TK = torch.topk(probs_TE, top_k, dim=-1)
    cap = capacity(T, E, top_k, capacity_factor)
    if cap is None:
        keep_TK = torch.ones_like(expert_TK, dtype=torch.bool)
    else:
        expert_A = expert_TK.t().reshape(-1)  # priority order: k-major, then token position
        onehot_AE = F.one_hot(expert_A, E)
        position_A = (onehot_AE.cumsum(0) * onehot_AE).sum(-1) - 1  # rank of the row inside its expert
        keep_TK = (position_A < cap).view(top_k, T).t()
    return Routing(expert_TK, weight_TK.to(logits_TE.dtype), keep_TK, probs_TE, logits_TE)


def load_balancing_loss(routing: Routing) -> torch.Tensor:
    """Switch Transformer's auxiliary loss ``E * sum_e f_e * P_e``.

    ``f_e`` is the share of assignments (before capacity drops) that chose expert e, ``P_e`` the mean
    router probability of e. It equals 1 for perfectly uniform routing and grows as routing collapses.
    """
    T, E = routing.probs_TE.shape
    counts_E = torch.bincount(routing.expert_TK.reshape(-1), minlength=E).to(routing.probs_TE.dtype)
    f_E = counts_E / routing.expert_TK.numel()
    P_E = routing.probs_TE.mean(0)
    return E * (f_E * P_E).sum()


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE's z-loss ``mean_t logsumexp(logits_t)^2``: keeps router logits small and stable."""
    return torch.logsumexp(logits_TE.float(), dim=-1).square().mean()
