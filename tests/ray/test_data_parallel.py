"""``zr.parallelize(model, zr.DataParallel(degree=D))`` on a dense model: replicas on unit actors, equal
to one process accumulating the shards, the loop unchanged, errors that name the fix."""

from __future__ import annotations

import helpers
import numpy as np
import pytest
import ray
import torch
from helpers import DenseLM, accumulate_reference, dense_batches

import zetta_ray as zr
from zetta_ray.errors import ConfigError, UnsupportedError


@pytest.fixture(scope="module")
def cluster(start_ray):
    ray_cluster = start_ray(num_cpus=4)
    ray.cloudpickle.register_pickle_by_value(helpers)  # DenseLM travels as a script's class would
    yield ray_cluster
    ray.cloudpickle.unregister_pickle_by_value(helpers)


def _train(dmodel, batches) -> list[float]:
    opt = dmodel.optimizer(torch.optim.AdamW, lr=1e-2)
    losses = []
    for x, y in batches:
        opt.zero_grad()
        logits, loss = dmodel(x, y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_two_replicas_equal_one_process_accumulating_the_shards(cluster):
    batches = dense_batches(5)
    ref_losses, ref_state = accumulate_reference(DenseLM(), batches, world=2)
    with zr.parallelize(DenseLM(), zr.DataParallel(degree=2)) as dmodel:
        assert [(u.role, u.data_rank) for u in dmodel.units] == [("data", 0), ("data", 1)]
        losses = _train(dmodel, batches)
        state = dmodel.state_dict()
        stats = dmodel.unit_stats()
        # the logits stay on the replicas until read; read, they are the whole batch's
        logits, loss = dmodel(*batches[0])
        assert isinstance(loss, zr.api.data_parallel.RemoteLoss)
        assert logits.fetch().shape == (8, 16, 64)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-4)
    assert list(state) == list(ref_state)
    for key, value in ref_state.items():
        torch.testing.assert_close(state[key], value, rtol=1e-4, atol=1e-6)
    assert [s["steps_applied"] for s in stats] == [5, 5]
    assert len({s["pid"] for s in stats}) == 2  # two processes, neither this one


def test_a_run_is_bitwise_the_same_run_to_run_and_inside_a_mesh(cluster):
    batches = dense_batches(3)
    with zr.parallelize(DenseLM(), zr.DataParallel(degree=2)) as a:
        first, state_a = _train(a, batches), a.state_dict()
    with zr.mesh(data=2):
        b = zr.parallelize(DenseLM())  # the mesh's data=2 gives DataParallel(2)
    with b:
        assert isinstance(b, zr.DataParallelModule)
        second, state_b = _train(b, batches), b.state_dict()
    assert first == second
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def test_bad_input_is_an_error_that_names_the_fix(cluster):
    with zr.parallelize(DenseLM(), zr.DataParallel(degree=2)) as dmodel:
        x, y = dense_batches(1, batch=3)[0]
        with pytest.raises(ConfigError, match="batch size 3 .* divisible by 2"):
            dmodel(x, y)
    mismatch = r"does not match the enclosing zr.mesh\(data=4\)"
    with pytest.raises(ConfigError, match=mismatch), zr.mesh(data=4):
        zr.parallelize(DenseLM(), zr.DataParallel(degree=2))
    whole_cpus = zr.RuntimeConfig(unit_num_cpus=1.0)  # a replica per CPU: the cluster holds 4
    with pytest.raises(zr.errors.InfeasibleSliceError, match="needs 9"):
        zr.parallelize(DenseLM(), zr.DataParallel(degree=9), runtime=whole_cpus)
    with pytest.raises(UnsupportedError, match="pipeline parallelism"):
        zr.parallelize(DenseLM(), zr.PipelineParallel(stages=2))
    with pytest.raises(UnsupportedError, match="MoE layers"):
        zr.parallelize(zr.MoETransformer(helpers.tiny_config()), zr.DataParallel(degree=2))
