"""A pipeline stage killed at forward, backward or the optimizer step is rebuilt from its trickle snapshot
(held by a MemoryPool actor) and the pipeline's calls since are replayed: the loop sees nothing and the
final state is bitwise the fault-free one."""

from __future__ import annotations

import pytest
import torch
from helpers import DenseLM, dense_batches, train_steps

import zetta_ray as zr
from zetta_ray.errors import UnitFailed, UnsupportedError

STEPS = 4


def _run(
    monkey: zr.chaos.Chaos | None, checkpoint=None, data: int = 1
) -> tuple[list[float], dict[str, torch.Tensor], list]:
    # with dropout, so that a replayed run must draw what the original drew
    strategies = [zr.PipelineParallel(stages=2, microbatches=2), zr.DataParallel(degree=data)]
    with zr.parallelize(DenseLM(dropout=0.2), *strategies, checkpoint=checkpoint) as dmodel:
        losses = train_steps(dmodel, dense_batches(STEPS), monkey=monkey)
        return losses, dmodel.state_dict(), dmodel.recoveries


@pytest.fixture(scope="module")
def fault_free(dense_cluster):
    return _run(None)


@pytest.mark.parametrize(("phase", "stage"), [("forward", 0), ("backward", 1), ("optimizer", 0)])
def test_a_stage_killed_in_a_phase_is_rebuilt_from_its_snapshot_bitwise(fault_free, phase, stage):
    losses, state, _ = fault_free
    monkey = zr.chaos.Chaos([zr.chaos.Kill(target="unit", step=2, phase=phase, index=stage)])
    got_losses, got_state, recoveries = _run(monkey)
    assert monkey.injected == [{"target": "unit", "step": 2, "phase": phase, "unit": stage}]
    assert [e.unit for e in recoveries] == [stage]
    # back to the newest step whose snapshots the pool had acknowledged when the kill landed (the kill
    # may find the stage still busy with the previous step's calls)
    assert recoveries[0].snapshot_step in (1, 2, 3)
    assert got_losses == losses
    assert all(torch.equal(got_state[k], v) for k, v in state.items()), "final state differs"


def test_a_stage_of_one_of_two_pipelines_killed_mid_step_rolls_back_both_bitwise(dense_cluster):
    losses, state, _ = _run(None, data=2)
    monkey = zr.chaos.Chaos([zr.chaos.Kill(target="unit", step=1, phase="backward", index=2)])
    got_losses, got_state, recoveries = _run(monkey, data=2)
    assert [(e.unit, e.rebuilt) for e in recoveries] == [(2, (2,))]  # replica 1's first stage
    assert got_losses == losses
    assert all(torch.equal(got_state[k], v) for k, v in state.items()), "final state differs"


def test_without_snapshots_a_dead_stage_is_a_named_fault(fault_free):
    monkey = zr.chaos.Chaos([zr.chaos.Kill(target="unit", step=1, phase="backward", index=1)])
    with pytest.raises(UnitFailed, match="unit 1"):
        _run(monkey, checkpoint=False)


def test_durable_checkpoints_of_stages_are_refused_by_name(dense_cluster, tmp_path):
    with pytest.raises(UnsupportedError, match="durable checkpoints of pipeline stages"):
        _run(None, checkpoint=zr.TrickleCheckpoint(durable_uri=str(tmp_path)))
