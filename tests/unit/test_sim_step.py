"""The step model's structure: pipeline bubble, recomputation, sequence parallelism, memory levers."""

from __future__ import annotations

from dataclasses import replace

import pytest

from zetta_ray.errors import ConfigError
from zetta_ray.model_spec import ModelSpec
from zetta_ray.sim.hardware import preset
from zetta_ray.sim.memory import memory_per_unit
from zetta_ray.sim.parallel import ParallelSpec
from zetta_ray.sim.step import step

pytestmark = pytest.mark.unit

GPT = ModelSpec(layers=96, hidden=12288, heads=96, seq_len=2048, vocab=51200)
A100 = preset("dgx-a100-80gb", units=64)
BASE = ParallelSpec(tp=8, pp=8, dp=1, global_batch=64, recompute="selective", sequence_parallel=True)


def test_the_bubble_is_p_minus_1_over_v_stage_times() -> None:
    for v in (1, 2, 3, 4):
        r = step(GPT, replace(BASE, virtual_stages=v), A100)
        stage = r.breakdown["stage_per_microbatch"]
        assert r.bubble_s == pytest.approx((8 - 1) / v * stage)
    one = step(GPT, replace(BASE, pp=1, dp=8, global_batch=64), preset("dgx-a100-80gb", units=64))
    assert one.bubble_s == 0


def test_recomputation_trades_time_for_memory_in_order() -> None:
    reports = {rc: step(GPT, replace(BASE, recompute=rc), A100) for rc in ("none", "selective", "full")}
    times = [reports[rc].step_time_s for rc in ("none", "selective", "full")]
    acts = [reports[rc].memory.activations for rc in ("none", "selective", "full")]
    assert times[0] < times[1] < times[2]
    assert acts[0] > acts[1] > acts[2]
    assert reports["full"].hfu > reports["full"].mfu  # recomputed FLOPs count as hardware work


def test_sequence_parallelism_divides_the_replicated_activations_by_tp() -> None:
    no_sp = replace(BASE, recompute="selective", sequence_parallel=False)
    with_sp = replace(BASE, recompute="selective", sequence_parallel=True)
    a, b = memory_per_unit(GPT, no_sp).activations, memory_per_unit(GPT, with_sp).activations
    assert b < a and (a - b) > 0.5 * a  # 10 sbh replicated + 24 sbh / t  ->  34 sbh / t


def test_zero1_shards_optimizer_state_over_data_parallel_replicas() -> None:
    par = ParallelSpec(tp=8, pp=1, dp=8, global_batch=64, recompute="full")
    small = ModelSpec(layers=24, hidden=4096, heads=32, seq_len=2048, vocab=51200)
    plain = memory_per_unit(small, par)
    sharded = memory_per_unit(small, replace(par, zero1=True))
    assert sharded.optimizer == pytest.approx(plain.optimizer / 8)
    assert sharded.parameters == plain.parameters


def test_mfu_tokens_and_traffic_are_consistent() -> None:
    r = step(GPT, BASE, A100)
    tokens = 64 * 2048
    assert r.tokens_per_s == pytest.approx(tokens / r.step_time_s)
    assert r.mfu == pytest.approx(tokens * GPT.model_flops_per_token() / (r.step_time_s * 64 * 312e12))
    assert r.bytes_per_tier["nvlink"] > 0 and r.bytes_per_tier["leaf"] > 0  # TP inside, PP between nodes
    assert 0 < r.mfu < 1


def test_moe_expert_parallelism_adds_all_to_all_and_imbalance_slows_it() -> None:
    moe = ModelSpec(
        kind="moe", layers=8, hidden=2048, heads=16, seq_len=2048, vocab=32000, n_experts=64, top_k=2
    )
    hw = preset("dgx-h100-80gb", units=64)
    par = ParallelSpec(tp=1, pp=1, dp=64, ep=64, global_batch=256, zero1=True)
    balanced = step(moe, par, hw)
    skewed = step(replace(moe, expert_imbalance=1.5), par, hw)
    assert skewed.step_time_s > balanced.step_time_s
    assert balanced.bytes_per_tier["leaf"] > 0  # a 64-unit expert group crosses nodes
    assert memory_per_unit(moe, par).parameters < memory_per_unit(moe, replace(par, ep=8)).parameters


@pytest.mark.parametrize(
    ("changes", "units", "fragment"),
    [
        ({}, 32, "multiply to"),
        ({"pp": 7, "dp": 1}, 56, "must divide model.layers"),
        ({"tp": 64, "dp": 1}, 512, "must divide model.heads"),
        ({"virtual_stages": 5}, 64, "must divide layers per stage"),
        ({"ep": 2}, 64, "needs model.kind='moe'"),
        ({"global_batch": 12, "virtual_stages": 2}, 64, "multiple of pp"),
    ],
)
def test_impossible_meshes_name_the_rule(changes: dict, units: int, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        replace(BASE, **changes).check(GPT, units)


def test_parallel_spec_rejects_inconsistent_fields() -> None:
    with pytest.raises(ConfigError, match="multiple of dp x micro_batch"):
        ParallelSpec(dp=3, global_batch=10)
    with pytest.raises(ConfigError, match="needs tp > 1"):
        ParallelSpec(global_batch=1, sequence_parallel=True)
    with pytest.raises(ConfigError, match="recompute"):
        ParallelSpec(global_batch=1, recompute="some")
