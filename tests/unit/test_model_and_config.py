"""Model shapes, loss wiring and config validation."""

from __future__ import annotations

import pytest
import torch

import zetta_ray as zr
from zetta_ray.errors import ConfigError
from zetta_ray.model_spec import ModelSpec
from zetta_ray.placement import Workload

pytestmark = pytest.mark.unit

TINY = dict(vocab_size=32, d_model=16, n_layers=2, n_heads=2, n_experts=4, top_k=2, d_ff=32, seq_len=8)


def test_forward_shapes_and_loss():
    torch.manual_seed(0)
    model = zr.MoETransformer(zr.MoEConfig(**TINY))
    idx = torch.randint(0, 32, (3, 8))
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 8, 32)
    assert loss.ndim == 0 and torch.isfinite(loss)
    logits2, none = model(idx)
    assert none is None
    torch.testing.assert_close(logits, logits2)


def test_loss_is_cross_entropy_plus_scaled_aux():
    torch.manual_seed(0)
    cfg = zr.MoEConfig(**TINY, aux_loss_coef=0.0)
    model = zr.MoETransformer(cfg)
    idx = torch.randint(0, 32, (2, 8))
    logits, loss = model(idx, idx)
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 32), idx.reshape(-1))
    torch.testing.assert_close(loss, ce)
    model.cfg.aux_loss_coef = 1.0
    _, loss_with_aux = model(idx, idx)
    assert loss_with_aux.item() > loss.item() + 0.5  # the balance loss alone is >= 1 per layer


def test_head_is_tied_to_embedding():
    model = zr.MoETransformer(zr.MoEConfig(**TINY))
    assert model.lm_head.weight is model.tok_emb.weight


def test_too_long_sequence_names_the_fix():
    model = zr.MoETransformer(zr.MoEConfig(**TINY))
    with pytest.raises(ValueError, match="seq_len=8"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_capacity_routing_drops_and_still_trains():
    torch.manual_seed(0)
    model = zr.MoETransformer(zr.MoEConfig(**{**TINY, "capacity_factor": 0.5}))
    idx = torch.randint(0, 32, (2, 8))
    _, loss = model(idx, idx)
    loss.backward()
    assert model.blocks[0].moe.gate.weight.grad is not None


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("d_model", 0),
        ("n_heads", 3),  # 16 is not divisible by 3
        ("top_k", 5),  # more than n_experts
        ("capacity_factor", -1.0),
        ("aux_loss_coef", -0.1),
        ("vocab_size", 2.5),
    ],
)
def test_config_rejects_bad_values_naming_field_value_and_fix(field, value):
    with pytest.raises(ConfigError) as err:
        zr.MoEConfig(**{**TINY, field: value})
    msg = str(err.value)
    assert field in msg or "d_model" in msg
    assert repr(value) in msg or str(value) in msg
    assert "must" in msg


def test_config_is_keyword_only():
    with pytest.raises(TypeError):
        zr.MoEConfig(32)  # type: ignore[misc]


def test_runtime_config_validation():
    with pytest.raises(ConfigError, match="deadline_s"):
        zr.RuntimeConfig(deadline_s=0)


def test_strategy_and_mesh_validation_without_ray():
    with pytest.raises(ConfigError, match="degree"):
        zr.ExpertParallel(degree=0)
    model = zr.MoETransformer(zr.MoEConfig(**TINY))
    with pytest.raises(ConfigError, match=r"degree=3\) must divide the number of experts \(4\)"):
        zr.parallelize(model, zr.ExpertParallel(degree=3))
    with pytest.raises(ConfigError, match="no zr.MoELayer"):
        zr.parallelize(torch.nn.Linear(2, 2), zr.ExpertParallel(degree=1))
    with (
        zr.mesh(expert=2, pipeline=2),
        pytest.raises(ConfigError, match="MoETransformer does not say how to split into stages"),
    ):
        zr.parallelize(model)
    with zr.mesh(expert=2), pytest.raises(ConfigError, match="does not match"):
        zr.parallelize(model, zr.ExpertParallel(degree=4))
    with pytest.raises(ConfigError, match="needs a strategy"):
        zr.parallelize(model)


def test_decorated_class_outside_a_mesh_is_a_plain_module():
    @zr.parallelize(strategy=zr.ExpertParallel(degree=2))
    class MyMoE(zr.MoETransformer):
        pass

    model = MyMoE(zr.MoEConfig(**TINY))
    assert isinstance(model, zr.MoETransformer)
    assert not isinstance(model, zr.DistributedModule)
    assert MyMoE.__name__ == "MyMoE"


def test_moe_config_converts_once_to_the_model_description_and_the_placer_workload():
    """``MoEConfig`` -> ``ModelSpec`` -> ``Workload``: the simulator and the placer read one description."""
    cfg = zr.MoEConfig(d_model=64, n_layers=3, n_heads=4, n_experts=8, top_k=2, d_ff=256, seq_len=32)
    spec = ModelSpec.from_moe_config(cfg)
    assert (spec.kind, spec.layers, spec.hidden, spec.heads, spec.f) == ("moe", 3, 64, 4, 256)
    assert (spec.n_experts, spec.top_k, spec.moe_layers, spec.vocab) == (8, 2, 3, cfg.vocab_size)
    # the description counts the parameters the model has (its layer norms and biases aside)
    model = zr.MoETransformer(cfg)
    expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n and n.endswith("weight"))
    assert expert == spec.expert_params
    w = Workload.from_moe_config(cfg, tokens_per_step=1024)
    assert w == Workload.from_model(spec, tokens_per_step=1024)
    assert (w.n_layers, w.n_experts, w.d_model, w.d_ff, w.params_per_expert) == (3, 8, 64, 256, 2 * 64 * 256)
