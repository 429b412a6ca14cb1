"""The three strategies composed: ``zr.mesh(data=2, pipeline=2, expert=2)`` on a model with MoE blocks
runs two pipelines of two stages whose MoE layers call two shared expert units; equal to one process
accumulating every micro-batch, and bitwise the same as the explicit strategies."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import MoEPipeLM, accumulate_reference, dense_batches, train_steps

import zetta_ray as zr
from zetta_ray.errors import UnsupportedError


def test_data_pipeline_and_expert_parallelism_compose_and_equal_one_process(dense_cluster):
    batches = dense_batches(3)
    ref_losses, ref_state = accumulate_reference(MoEPipeLM(), batches, world=4)  # 2 replicas x 2 micro
    strategies = (
        zr.DataParallel(degree=2),
        zr.PipelineParallel(stages=2, microbatches=2),
        zr.ExpertParallel(degree=2),
    )
    with zr.parallelize(MoEPipeLM(), *strategies) as dmodel:
        assert [(u.role, u.data_rank, u.stage) for u in dmodel.units] == [
            ("stage", 0, 0),
            ("stage", 0, 1),
            ("stage", 1, 0),
            ("stage", 1, 1),
            ("expert", None, None),
            ("expert", None, None),
        ]
        assert sorted(e for u in dmodel.units[4:] for e in u.experts) == [
            (l, e) for l in range(2) for e in range(4)
        ]
        losses = train_steps(dmodel, batches)
        state = dmodel.state_dict()
        assert [s["steps_applied"] for s in dmodel.unit_stats()] == [3] * 6
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-4)
    assert list(state) == list(ref_state)
    # atol 2e-5 (lr 1e-2): summed in another order, a near-zero gradient element differs in its last
    # bits, and AdamW's m / sqrt(v) turns that into an update difference of up to ~1e-3 of a step
    for key, value in ref_state.items():
        torch.testing.assert_close(
            state[key], value, rtol=1e-4, atol=2e-5, msg=lambda m, key=key: f"{key}: {m}"
        )
    with zr.mesh(data=2, pipeline=2, expert=2):  # the defaults: PipelineParallel(2, microbatches=4)
        dmodel = zr.parallelize(MoEPipeLM())
    with dmodel:
        assert dmodel.microbatches == 4 and len(dmodel.units) == 6
        again = train_steps(dmodel, batches)
    np.testing.assert_allclose(again, ref_losses, rtol=1e-4)  # 8 micro-batches: the same sums, other order


def test_pipeline_stages_calling_experts_repeat_bitwise_and_refuse_trickle_by_name(dense_cluster):
    batches = dense_batches(2)
    strategies = (zr.PipelineParallel(stages=2, microbatches=2), zr.ExpertParallel(degree=2))
    runs = []
    for _ in range(2):
        with zr.parallelize(MoEPipeLM(), *strategies) as dmodel:
            runs.append((train_steps(dmodel, batches), dmodel.state_dict()))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(runs[0][1][k], v) for k, v in runs[1][1].items())
    with pytest.raises(UnsupportedError, match="trickle checkpoints of pipeline stages with ExpertParallel"):
        zr.parallelize(MoEPipeLM(), *strategies, checkpoint=zr.TrickleCheckpoint())
