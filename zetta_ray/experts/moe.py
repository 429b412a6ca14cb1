"""An MoE feed-forward layer that runs in one process, with a seam where experts can run elsewhere.

The layer routes, groups token rows by expert, runs the experts and combines their outputs. The experts
run through an ``ExpertExecutor``: by default the local ``nn.ModuleList``; ``zr.parallelize`` swaps in one
that runs them on remote actors. Routing, grouping and combining are the same code either way, which is
why a distributed run trains exactly like a single-process one.

Shape legend: B = batch, S = sequence, T = tokens (B * S), D = model dim, E = experts, K = top-k,
A = assignments (T * K), N = kept assignments, grouped by expert
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from zetta_ray.experts.ffn import ExpertFFN
from zetta_ray.experts.router import load_balancing_loss, route, router_z_loss

__all__ = ["DispatchPlan", "ExpertExecutor", "MoELayer", "combine", "plan_dispatch"]


@dataclass(frozen=True, slots=True)
class DispatchPlan:
    """Which rows go to which expert. Rows are grouped by expert id, in token order inside a group."""

    order_N: torch.Tensor  # index into the flattened (T, K) assignments
    token_N: torch.Tensor  # the token each row comes from
    counts_E: list[int]  # rows per expert; experts with 0 rows are not run


def plan_dispatch(expert_TK: torch.Tensor, keep_TK: torch.Tensor, n_experts: int) -> DispatchPlan:
    K = expert_TK.shape[1]
    expert_A = expert_TK.reshape(-1)
    kept_A = keep_TK.reshape(-1).nonzero().squeeze(1)
    order_N = kept_A[torch.argsort(expert_A[kept_A], stable=True)]
    counts_E = torch.bincount(expert_A[kept_A], minlength=n_experts).tolist()
    return DispatchPlan(order_N=order_N, token_N=order_N // K, counts_E=counts_E)


def combine(
    y_ND: torch.Tensor, plan: DispatchPlan, weight_TK: torch.Tensor, keep_TK: torch.Tensor
) -> torch.Tensor:
    """Weight expert outputs back into token order. The sum over k runs in a fixed order."""
    T, K = weight_TK.shape
    buf_AD = y_ND.new_zeros(T * K, y_ND.shape[-1])
    buf_AD = buf_AD.index_put((plan.order_N,), y_ND)
    gate_TK = weight_TK * keep_TK.to(weight_TK.dtype)
    return (buf_AD.view(T, K, -1) * gate_TK.unsqueeze(-1)).sum(1)


class ExpertExecutor(Protocol):
    """Runs the experts of one MoE layer on rows grouped by expert (``counts_E`` rows each)."""

    def __call__(self, x_ND: torch.Tensor, counts_E: list[int]) -> torch.Tensor: ...


class _LocalExperts:
    def __init__(self, experts: nn.ModuleList):
        self.experts = experts

    def __call__(self, x_ND: torch.Tensor, counts_E: list[int]) -> torch.Tensor:
        chunks = x_ND.split(counts_E)
        outs = [self.experts[e](chunk) for e, chunk in enumerate(chunks) if counts_E[e] > 0]
        return torch.cat(outs) if outs else x_ND.new_zeros(x_ND.shape)


class MoELayer(nn.Module):
    """Router + ``n_experts`` FFN experts; returns ``(y_BSD, aux_loss)``.

    ``aux_loss`` is the load-balancing loss plus ``z_loss_coef`` times the router z-loss; the model scales
    it by ``aux_loss_coef``.
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        n_experts: int,
        top_k: int,
        capacity_factor: float | None = None,
        z_loss_coef: float = 0.0,
    ):
        super().__init__()
        self.n_experts = n_experts
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.z_loss_coef = z_loss_coef
        self.gate = nn.Linear(d_model, n_experts, bias=False)
        self.experts = nn.ModuleList(ExpertFFN(d_model, d_ff) for _ in range(n_experts))
        self.executor: ExpertExecutor | None = None  # None: run self.experts here

    def forward(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        routing = route(self.gate(x_TD), self.top_k, self.capacity_factor)
        plan = plan_dispatch(routing.expert_TK, routing.keep_TK, self.n_experts)
        run = self.executor or _LocalExperts(self.experts)
        y_ND = run(x_TD[plan.token_N], plan.counts_E)
        y_TD = combine(y_ND, plan, routing.weight_TK, routing.keep_TK)
        aux = load_balancing_loss(routing) + self.z_loss_coef * router_z_loss(routing.logits_TE)
        return y_TD.view(B, S, D), aux
