"""``zr.parallelize(moe_model, zr.DataParallel(degree=2), zr.ExpertParallel(degree=2))``: two dense
replicas, each on half of every batch, sharing two expert units that they call directly. Equal to one
process accumulating the two halves; bitwise from run to run; a dead replica is rebuilt from its sibling
with the result bitwise the fault-free one; a dead expert unit is a named, unrecovered failure."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import accumulate_reference, dense_batches, tiny_config, train_steps

import zetta_ray as zr
from zetta_ray.errors import RecoveryFailed

STRATEGIES = (zr.DataParallel(degree=2), zr.ExpertParallel(degree=2))


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return zr.MoETransformer(tiny_config(n_experts=4))


def _run(
    monkey: zr.chaos.Chaos | None = None, checkpoint=False
) -> tuple[list[float], dict[str, torch.Tensor], list, list]:
    with zr.parallelize(_model(), *STRATEGIES, checkpoint=checkpoint) as dmodel:
        losses = train_steps(dmodel, dense_batches(3), monkey=monkey)
        return losses, dmodel.state_dict(), dmodel.recoveries, dmodel.recovered_experts


@pytest.fixture(scope="module")
def fault_free(dense_cluster):
    return _run()


def test_replicas_sharing_expert_units_equal_one_process_accumulating_the_shards(fault_free):
    ref_losses, ref_state = accumulate_reference(_model(), dense_batches(3), world=2)
    losses, state, recoveries, _ = fault_free
    assert recoveries == []
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-4)
    assert list(state) == list(ref_state)
    for key, value in ref_state.items():
        torch.testing.assert_close(state[key], value, rtol=1e-4, atol=1e-6)


def test_units_are_two_replicas_then_two_expert_units_and_a_run_repeats_bitwise(fault_free):
    with zr.parallelize(_model(), *STRATEGIES, checkpoint=False) as dmodel:
        assert [(u.index, u.role, u.data_rank) for u in dmodel.units] == [
            (0, "data", 0),
            (1, "data", 1),
            (2, "expert", None),
            (3, "expert", None),
        ]
        assert sorted(e for u in dmodel.units[2:] for e in u.experts) == [
            (l, e) for l in range(2) for e in range(4)
        ]
        losses = train_steps(dmodel, dense_batches(3))
        state = dmodel.state_dict()
        assert [s["steps_applied"] for s in dmodel.unit_stats()] == [3, 3, 3, 3]
    assert losses == fault_free[0]
    assert all(torch.equal(state[k], v) for k, v in fault_free[1].items())


@pytest.mark.parametrize("phase", ["backward", "optimizer"])
def test_a_replica_killed_mid_step_is_rebuilt_and_the_experts_count_its_gradients_once(fault_free, phase):
    monkey = zr.chaos.Chaos([zr.chaos.Kill(target="unit", step=1, phase=phase, index=1)])
    losses, state, recoveries, _ = _run(monkey)
    assert [e.unit for e in recoveries] == [1]
    assert losses == fault_free[0]
    assert all(torch.equal(state[k], v) for k, v in fault_free[1].items()), "final state differs"


@pytest.mark.parametrize("phase", ["forward", "backward", "optimizer"])
def test_a_shared_expert_unit_killed_mid_step_is_rolled_back_with_its_siblings_bitwise(fault_free, phase):
    monkey = zr.chaos.Chaos([zr.chaos.Kill(target="unit", step=1, phase=phase, index=3)])
    losses, state, recoveries, experts = _run(monkey, checkpoint=None)  # snapshots on: the default
    assert monkey.injected == [{"target": "unit", "step": 1, "phase": phase, "unit": 3}]
    assert recoveries == [] and [e.unit for e in experts] == [3]  # no replica rebuilt; unit 3 rolled back
    assert losses == fault_free[0]
    assert all(torch.equal(state[k], v) for k, v in fault_free[1].items()), "final state differs"


def test_without_snapshots_a_dead_expert_unit_is_a_named_failure(fault_free):
    monkey = zr.chaos.Chaos([zr.chaos.Kill(target="unit", step=1, phase="forward", index=3)])
    with pytest.raises(
        RecoveryFailed, match="expert units run without snapshots here \\(checkpoint=False\\)"
    ):
        _run(monkey)


def test_data_parallelism_of_an_moe_model_puts_its_experts_on_one_shared_unit_by_default(dense_cluster):
    with zr.parallelize(_model(), zr.DataParallel(degree=2), checkpoint=False) as dmodel:
        assert [u.role for u in dmodel.units] == ["data", "data", "expert"]
        assert len(dmodel.units[2].experts) == 8  # 2 layers x 4 experts


def test_pipeline_stages_of_a_model_without_the_pipeline_protocol_are_refused_by_name(dense_cluster):
    with pytest.raises(zr.errors.ConfigError, match="MoETransformer does not say how to split into stages"):
        zr.parallelize(_model(), zr.PipelineParallel(stages=2))
    with pytest.raises(zr.errors.UnsupportedError, match="no zr.MoELayer"):
        zr.parallelize(torch.nn.Linear(2, 2), *STRATEGIES)
