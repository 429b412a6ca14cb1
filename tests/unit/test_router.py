"""Router semantics against hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from zetta_ray.experts import capacity, combine, load_balancing_loss, plan_dispatch, route, router_z_loss

pytestmark = pytest.mark.unit


def _logits(probs: list[list[float]]) -> torch.Tensor:
    return torch.tensor(probs).log()  # softmax(log p) == p when rows sum to 1


def test_top_k_picks_largest_probabilities_without_renormalising():
    r = route(_logits([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]]), top_k=2)
    assert r.expert_TK.tolist() == [[1, 2], [0, 2]]
    torch.testing.assert_close(r.weight_TK, torch.tensor([[0.6, 0.3], [0.5, 0.3]]))
    assert r.keep_TK.all()


def test_top_1_weight_is_the_softmax_probability():
    r = route(torch.tensor([[0.0, math.log(3.0)]]), top_k=1)
    assert r.expert_TK.tolist() == [[1]]
    torch.testing.assert_close(r.weight_TK, torch.tensor([[0.75]]))


def test_capacity_formula():
    assert capacity(n_tokens=10, n_experts=4, top_k=2, capacity_factor=1.0) == 5  # ceil(1.0*10*2/4)
    assert capacity(n_tokens=10, n_experts=4, top_k=1, capacity_factor=1.25) == 4  # ceil(3.125)
    assert capacity(n_tokens=10, n_experts=4, top_k=2, capacity_factor=None) is None


def test_capacity_drops_later_tokens_and_second_choices_first():
    # 4 tokens, 2 experts, top-2, capacity_factor 0.5 -> capacity ceil(0.5*4*2/2) = 2 rows per expert.
    # First choices: t0->0, t1->0, t2->0, t3->1. Second choices: t0->1, t1->1, t2->1, t3->0.
    probs = [[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.4, 0.6]]
    r = route(_logits(probs), top_k=2, capacity_factor=0.5)
    assert r.expert_TK.tolist() == [[0, 1], [0, 1], [0, 1], [1, 0]]
    # Expert 0 serves first choices t0, t1; t2's first choice is dropped (3rd row), t3's second too.
    # Expert 1 serves t3's first choice, then t0's second choice; t1's and t2's second choices drop.
    assert r.keep_TK.tolist() == [[True, True], [True, False], [False, False], [True, False]]


def test_load_balancing_loss_hand_computed():
    probs = [[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.4, 0.6]]
    r = route(_logits(probs), top_k=1)
    # f = share of assignments: expert 0 gets 3 of 4, expert 1 gets 1 of 4.
    # P = mean prob: expert 0 (0.9+0.8+0.7+0.4)/4 = 0.7, expert 1 0.3.
    expected = 2 * (0.75 * 0.7 + 0.25 * 0.3)
    torch.testing.assert_close(load_balancing_loss(r), torch.tensor(expected))


def test_load_balancing_loss_is_one_when_uniform():
    r = route(torch.zeros(8, 4) + torch.eye(4).repeat(2, 1) * 1e-3, top_k=1)
    torch.testing.assert_close(load_balancing_loss(r), torch.tensor(1.0), rtol=1e-3, atol=1e-3)


def test_router_z_loss_hand_computed():
    logits = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    # logsumexp rows: log 2 and 1 + log 2.
    expected = (math.log(2) ** 2 + (1 + math.log(2)) ** 2) / 2
    torch.testing.assert_close(router_z_loss(logits), torch.tensor(expected))


def test_dispatch_groups_rows_by_expert_and_combine_matches_a_loop():
    torch.manual_seed(0)
    T, D, E, K = 12, 5, 4, 2
    x_TD = torch.randn(T, D)
    r = route(torch.randn(T, E), top_k=K, capacity_factor=0.75)
    plan = plan_dispatch(r.expert_TK, r.keep_TK, E)
    assert sum(plan.counts_E) == int(r.keep_TK.sum())
    experts_of_rows = torch.repeat_interleave(torch.arange(E), torch.tensor(plan.counts_E))
    assert torch.equal(r.expert_TK.reshape(-1)[plan.order_N], experts_of_rows)
    scale_E = torch.arange(1.0, E + 1)  # a stand-in expert: multiply rows by (expert + 1)
    y_ND = x_TD[plan.token_N] * scale_E[experts_of_rows].unsqueeze(1)
    out_TD = combine(y_ND, plan, r.weight_TK, r.keep_TK)
    expected = torch.zeros(T, D)
    for t in range(T):
        for k in range(K):
            if r.keep_TK[t, k]:
                e = int(r.expert_TK[t, k])
                expected[t] += r.weight_TK[t, k] * x_TD[t] * (e + 1)
    torch.testing.assert_close(out_TD, expected)
