"""Parameter and FLOP counts of the simulator's transformer model against published closed forms."""

from __future__ import annotations

import pytest

from zetta_ray.errors import ConfigError
from zetta_ray.model_spec import ModelSpec

pytestmark = pytest.mark.unit


def _gpt(layers: int, hidden: int, heads: int) -> ModelSpec:
    return ModelSpec(layers=layers, hidden=hidden, heads=heads, seq_len=2048, vocab=51200)


@pytest.mark.parametrize(
    ("model", "params"),
    [
        (_gpt(96, 12288, 96), 174.6e9),  # GPT-3 175B
        (_gpt(128, 25600, 160), 1008e9),  # Narayanan et al.: "1.008T"
    ],
)
def test_dense_parameter_counts(model: ModelSpec, params: float) -> None:
    assert model.total_params == pytest.approx(params, rel=0.003)
    assert model.active_params == model.total_params


def test_mixtral_8x7b_total_and_active_parameters() -> None:
    m = ModelSpec(
        kind="moe", layers=32, hidden=4096, heads=32, kv_heads=8, ffn_hidden=14336, gated_mlp=True,
        seq_len=4096, vocab=32000, n_experts=8, top_k=2,
    )  # fmt: skip
    # Mistral reports 46.7B total and 12.9B active (with untied output embeddings, +0.13B here).
    assert m.total_params == pytest.approx(46.7e9 - 0.13e9, rel=0.01)
    assert m.active_params == pytest.approx(12.9e9 - 0.13e9, rel=0.02)


@pytest.mark.parametrize(("layers", "hidden", "heads"), [(48, 6144, 64), (128, 25600, 160)])
def test_flops_match_narayanan_closed_forms(layers: int, hidden: int, heads: int) -> None:
    m = _gpt(layers, hidden, heads)
    s, v, h, n = 2048, 51200, hidden, layers
    no_recompute = 72 * s * n * h * h * (1 + s / (6 * h) + v / (12 * n * h)) / s
    full = 96 * s * n * h * h * (1 + s / (6 * h) + v / (16 * n * h)) / s
    assert m.model_flops_per_token() == pytest.approx(no_recompute, rel=1e-9)
    assert m.model_flops_per_token() + m.recompute_flops_per_token("full") == pytest.approx(full, rel=1e-9)
    assert m.recompute_flops_per_token("none") == 0


def test_moe_active_flops_scale_with_top_k_not_with_experts() -> None:
    base = dict(kind="moe", layers=4, hidden=1024, heads=8, seq_len=512, vocab=1000)
    k1 = ModelSpec(**base, n_experts=8, top_k=1)
    k2 = ModelSpec(**base, n_experts=8, top_k=2)
    e64 = ModelSpec(**base, n_experts=64, top_k=1)
    mlp = 6 * 4 * k1.mlp_params
    assert k2.model_flops_per_token() - k1.model_flops_per_token() == pytest.approx(mlp, rel=1e-9)
    assert e64.total_params > 7 * k1.expert_params
    assert e64.model_flops_per_token() - k1.model_flops_per_token() == pytest.approx(6 * 4 * 1024 * 56)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"kind": "sparse"}, "use 'dense' or 'moe'"),
        ({"hidden": 1000, "heads": 3}, "divisible by heads"),
        ({"n_experts": 8}, "set kind='moe'"),
        ({"kind": "moe", "n_experts": 4, "top_k": 5}, "top_k=5 must be <= n_experts"),
        ({"kind": "moe", "n_experts": 4, "expert_imbalance": 0.5}, "busiest over mean"),
        ({"kv_heads": 3}, "must divide heads"),
    ],
)
def test_invalid_models_say_why(kwargs: dict, fragment: str) -> None:
    base = dict(layers=2, hidden=1024, heads=8, seq_len=128, vocab=100)
    with pytest.raises(ConfigError, match=fragment):
        ModelSpec(**{**base, **kwargs})
