"""``zr.parallelize(model, zr.DataParallel(degree=D))`` on a dense model: replicas on unit actors, equal
to one process accumulating the shards, the loop unchanged, errors that name the fix."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import DenseLM, accumulate_reference, dense_batches, train_steps

import zetta_ray as zr
from zetta_ray.errors import ConfigError, UnsupportedError


def test_two_replicas_equal_one_process_accumulating_the_shards(dense_cluster):
    batches = dense_batches(5)
    ref_losses, ref_state = accumulate_reference(DenseLM(), batches, world=2)
    with zr.parallelize(DenseLM(), zr.DataParallel(degree=2)) as dmodel:
        assert [(u.role, u.data_rank) for u in dmodel.units] == [("data", 0), ("data", 1)]
        losses = train_steps(dmodel, batches)
        state = dmodel.state_dict()
        stats = dmodel.unit_stats()
        # the logits stay on the replicas until read; read, they are the whole batch's
        logits, loss = dmodel(*batches[0])
        assert isinstance(loss, zr.api.remote.RemoteLoss)
        assert logits.fetch().shape == (8, 16, 64)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-4)
    assert list(state) == list(ref_state)
    for key, value in ref_state.items():
        torch.testing.assert_close(state[key], value, rtol=1e-4, atol=1e-6)
    assert [s["steps_applied"] for s in stats] == [5, 5]
    assert len({s["pid"] for s in stats}) == 2  # two processes, neither this one


def test_a_run_is_bitwise_the_same_run_to_run_and_inside_a_mesh(dense_cluster):
    batches = dense_batches(3)
    with zr.parallelize(DenseLM(), zr.DataParallel(degree=2)) as a:
        first, state_a = train_steps(a, batches), a.state_dict()
    with zr.mesh(data=2):
        b = zr.parallelize(DenseLM())  # the mesh's data=2 gives DataParallel(2)
    with b:
        assert isinstance(b, zr.DataParallelModule)
        second, state_b = train_steps(b, batches), b.state_dict()
    assert first == second
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def test_bad_input_is_an_error_that_names_the_fix(dense_cluster):
    with zr.parallelize(DenseLM(), zr.DataParallel(degree=2)) as dmodel:
        x, y = dense_batches(1, batch=3)[0]
        with pytest.raises(
            ConfigError, match="batch size 3 .* 2 equal parts; use a batch size divisible by 2"
        ):
            dmodel(x, y)
    mismatch = r"does not match the enclosing zr.mesh\(data=4\)"
    with pytest.raises(ConfigError, match=mismatch), zr.mesh(data=4):
        zr.parallelize(DenseLM(), zr.DataParallel(degree=2))
    whole_cpus = zr.RuntimeConfig(unit_num_cpus=1.0)  # a replica per CPU: the cluster holds 4
    with pytest.raises(zr.errors.InfeasibleSliceError, match="needs 9"):
        zr.parallelize(DenseLM(), zr.DataParallel(degree=9), runtime=whole_cpus)
    with pytest.raises(UnsupportedError, match="no zr.MoELayer: there are no experts"):
        zr.parallelize(DenseLM(), zr.DataParallel(degree=2), zr.ExpertParallel(degree=2))
