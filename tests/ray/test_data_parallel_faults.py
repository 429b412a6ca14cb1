"""A data-parallel replica killed at forward, backward or the optimizer step is rebuilt from a live
sibling (no checkpoint read): the loop sees nothing and the final state is bitwise the fault-free one."""

from __future__ import annotations

import pytest
import torch
from helpers import DenseLM, dense_batches, train_steps

import zetta_ray as zr

STEPS = 4


def _run(monkey: zr.chaos.Chaos | None) -> tuple[list[float], dict[str, torch.Tensor], list]:
    # with dropout, so that a replayed forward must draw what the original drew
    with zr.parallelize(DenseLM(dropout=0.2), zr.DataParallel(degree=2)) as dmodel:
        losses = train_steps(dmodel, dense_batches(STEPS), monkey=monkey)
        return losses, dmodel.state_dict(), dmodel.recoveries


@pytest.fixture(scope="module")
def fault_free(dense_cluster):
    return _run(None)


@pytest.mark.parametrize("phase", ["forward", "backward", "optimizer"])
def test_a_replica_killed_in_a_phase_is_rebuilt_from_its_sibling_bitwise(fault_free, phase):
    losses, state, _ = fault_free
    monkey = zr.chaos.Chaos([zr.chaos.Kill(target="unit", step=1, phase=phase, index=1)])
    got_losses, got_state, recoveries = _run(monkey)
    assert monkey.injected == [{"target": "unit", "step": 1, "phase": phase, "unit": 1}]
    assert [(e.unit, e.sibling) for e in recoveries] == [(1, 0)]
    assert got_losses == losses
    assert all(torch.equal(got_state[k], v) for k, v in state.items()), "final state differs"


def test_a_fault_free_run_with_dropout_is_bitwise_the_same_from_run_to_run(fault_free):
    losses, state, recoveries = fault_free
    assert recoveries == []
    again_losses, again_state, _ = _run(None)
    assert again_losses == losses
    assert all(torch.equal(again_state[k], v) for k, v in state.items())
