"""``zr.parallelize(model, zr.PipelineParallel(stages=P, microbatches=M))`` on a dense model: stages on
unit actors, micro-batches flowing stage to stage, equal to one process accumulating the micro-batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import DenseLM, accumulate_reference, dense_batches, train_steps

import zetta_ray as zr
from zetta_ray.errors import ConfigError


@pytest.mark.parametrize("kind", ["1f1b", "gpipe"])
def test_two_stages_equal_one_process_accumulating_the_micro_batches(dense_cluster, kind):
    batches = dense_batches(4)
    ref_losses, ref_state = accumulate_reference(DenseLM(), batches, world=4)
    strategy = zr.PipelineParallel(stages=2, microbatches=4, schedule=kind)
    with zr.parallelize(DenseLM(), strategy) as dmodel:
        assert [(u.role, u.stage) for u in dmodel.units] == [("stage", 0), ("stage", 1)]
        losses = train_steps(dmodel, batches)
        state = dmodel.state_dict()
        with torch.no_grad():  # forward only: nothing to commit, the logits of the whole batch
            logits, loss = dmodel(*batches[0])
            assert logits.fetch().shape == (8, 16, 64)
            assert loss.item() > 0
        assert dmodel.state_dict().keys() == state.keys()
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-4)
    assert list(state) == list(ref_state)
    for key, value in ref_state.items():
        torch.testing.assert_close(state[key], value, rtol=1e-4, atol=1e-6)


def test_two_pipelines_of_two_stages_equal_one_process_accumulating_every_micro_batch(dense_cluster):
    batches = dense_batches(3)
    ref_losses, ref_state = accumulate_reference(DenseLM(), batches, world=4)  # 2 replicas x 2 micro-batches
    strategies = (zr.DataParallel(degree=2), zr.PipelineParallel(stages=2, microbatches=2))
    with zr.parallelize(DenseLM(), *strategies) as dmodel:
        assert [(u.role, u.data_rank, u.stage) for u in dmodel.units] == [
            ("stage", 0, 0),
            ("stage", 0, 1),
            ("stage", 1, 0),
            ("stage", 1, 1),
        ]
        losses = train_steps(dmodel, batches)
        state = dmodel.state_dict()
        with torch.no_grad():  # the logits of the whole batch, both replicas' shards in order
            logits, _ = dmodel(*batches[0])
            assert logits.fetch().shape == (8, 16, 64)
        stats = dmodel.unit_stats()
        assert {s["steps_applied"] for s in stats} == {3}
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-4)
    for key, value in ref_state.items():
        torch.testing.assert_close(state[key], value, rtol=1e-4, atol=1e-6)
    four = "x DataParallel\\(degree=2\\) cannot split .* 4 equal parts"
    with zr.parallelize(DenseLM(), *strategies) as dmodel, pytest.raises(ConfigError, match=four):
        dmodel(*dense_batches(1, batch=6)[0])


def test_the_mesh_gives_a_default_pipeline_and_a_run_repeats_bitwise(dense_cluster):
    batches = dense_batches(2)
    with zr.mesh(pipeline=2):
        a = zr.parallelize(DenseLM(dropout=0.1))  # PipelineParallel(2, microbatches=4)
    with a:
        assert a.microbatches == 4
        first, state_a = train_steps(a, batches), a.state_dict()
    with zr.parallelize(DenseLM(dropout=0.1), zr.PipelineParallel(stages=2, microbatches=4)) as b:
        second, state_b = train_steps(b, batches), b.state_dict()
    assert first == second
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def test_bad_input_is_an_error_that_names_the_fix(dense_cluster):
    with pytest.raises(ConfigError, match="more stages than DenseLM has layers \\(4"):
        zr.parallelize(DenseLM(), zr.PipelineParallel(stages=5))
    with pytest.raises(ConfigError, match="pipeline_layers"):
        zr.parallelize(torch.nn.Linear(2, 2), zr.PipelineParallel(stages=2))
    three = zr.PipelineParallel(stages=2, microbatches=3)
    with zr.parallelize(DenseLM(), three) as dmodel, pytest.raises(ConfigError, match="8 .* 3 equal parts"):
        dmodel(*dense_batches(1)[0])
