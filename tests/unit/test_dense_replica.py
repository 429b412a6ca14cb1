"""Data-parallel dense replicas (``zetta_ray/actors/dense_replica.py``) driven in one process, their
buckets handed to each other directly: the unit logic a GPU smoke script or a Ray actor drives."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from helpers import DenseLM, accumulate_reference, dense_batches

from zetta_ray.actors.dense_replica import DenseReplica, split_outputs
from zetta_ray.errors import DeadlineExceeded

pytestmark = pytest.mark.usefixtures("one_thread")


def _replicas(world: int, bucket_bytes: int = 4 * 1024, deadline_s: float = 5.0) -> list[DenseReplica]:
    model = DenseLM()
    replicas: list[DenseReplica] = []

    def sender(rank: int):
        def send(epoch: int, passes: int, bucket: int, flat: np.ndarray) -> None:
            for peer in replicas:
                peer.receive(epoch, passes, rank, bucket, flat)

        return send

    for r in range(world):
        replicas.append(
            DenseReplica(
                r,
                world,
                copy.deepcopy(model),
                bucket_bytes=bucket_bytes,
                send=sender(r),
                deadline_s=deadline_s,
            )
        )
    for rep in replicas:
        rep.set_optimizer(torch.optim.AdamW, {"lr": 1e-2})
    return replicas


def _train(replicas: list[DenseReplica], batches) -> list[float]:
    world, losses = len(replicas), []
    for x, y in batches:
        for rep in replicas:
            rep.zero_grad()
        step_losses = []
        shards = list(zip(x.chunk(world), y.chunk(world), strict=True))
        for rep, (xs, ys) in zip(replicas, shards, strict=True):
            step_losses.append(rep.forward([xs.numpy(), ys.numpy()])["loss"])
            rep.backward()
        for rep in replicas:
            rep.step(passes=1)
        losses.append(float(np.mean(step_losses)))
    return losses


def test_replicas_equal_one_process_accumulating_the_shards_and_each_other_bitwise():
    batches = dense_batches(5)
    replicas = _replicas(world=2)
    assert len(replicas[0].buckets.buckets) > 1  # several buckets travel, not one
    losses = _train(replicas, batches)
    ref_losses, ref_state = accumulate_reference(DenseLM(), batches, world=2)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-4)
    a, b = replicas[0].state_dict(), replicas[1].state_dict()
    for key, value in ref_state.items():
        np.testing.assert_allclose(a[key], value.numpy(), rtol=1e-4, atol=1e-6, err_msg=key)
        assert np.array_equal(a[key], b[key]), f"replicas differ in {key}"


def test_the_same_mesh_gives_bitwise_the_same_run():
    batches = dense_batches(3)
    first, second = _replicas(world=2), _replicas(world=2)
    assert _train(first, batches) == _train(second, batches)
    s1, s2 = first[0].state_dict(), second[0].state_dict()
    assert all(np.array_equal(s1[k], s2[k]) for k in s1)


def test_a_rebuilt_replica_continues_bitwise_as_its_sibling():
    batches = dense_batches(4)
    replicas = _replicas(world=2)
    _train(replicas, batches[:2])
    fresh = _replicas(world=2)  # a replacement for rank 1: new process state, the sibling's copy
    fresh[1].load_state(replicas[0].state())
    fresh[0].load_state(replicas[0].state())
    _train(fresh, batches[2:])
    _train(replicas, batches[2:])
    a, b = replicas[0].state_dict(), fresh[1].state_dict()
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_reduction_waits_within_its_deadline_and_names_the_missing_replica():
    replicas = _replicas(world=2, deadline_s=0.3)
    x, y = dense_batches(1)[0]
    replicas[0].zero_grad()
    replicas[0].forward([x[:4].numpy(), y[:4].numpy()])
    replicas[0].backward()  # replica 1 never sends its buckets
    with pytest.raises(DeadlineExceeded, match=r"waiting for replicas \[1\]"):
        replicas[0].step(passes=1)


def test_a_model_must_return_one_scalar_loss():
    logits = torch.zeros(2, 3)
    assert split_outputs((logits, torch.tensor(1.0)))[0] == 1
    assert split_outputs(torch.tensor(1.0))[0] == 0
    with pytest.raises(TypeError, match="exactly one 0-d loss"):
        split_outputs((logits, logits))
    with pytest.raises(TypeError, match="must return tensors"):
        split_outputs({"loss": torch.tensor(1.0)})
