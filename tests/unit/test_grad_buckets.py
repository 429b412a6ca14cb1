"""Gradient buckets of data-parallel replicas (``zetta_ray/actors/buckets.py``): ready during backward,
reduced in replica order whatever the arrival order, equal to one process accumulating the shards."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch

from zetta_ray.actors.buckets import BucketReducer, GradBuckets, plan_buckets
from zetta_ray.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

D_IN, D_HIDDEN, WORLD, BATCH = 8, 16, 4, 12


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(D_IN, D_HIDDEN),
        torch.nn.GELU(),
        torch.nn.Linear(D_HIDDEN, D_HIDDEN),
        torch.nn.GELU(),
        torch.nn.Linear(D_HIDDEN, 1),
    )


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, D_IN, generator=g), torch.randn(BATCH, 1, generator=g)


def _loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(model(x), y)


def test_buckets_fill_in_reverse_order_and_cover_every_parameter_once():
    params = list(_model().parameters())
    buckets = plan_buckets(params, bucket_bytes=4 * 200)
    packed = [i for b in buckets for i in b.params]
    assert sorted(packed) == list(range(len(params)))
    assert packed == sorted(packed, reverse=True)  # last layers first: backward makes them first
    assert all(b.numel == sum(params[i].numel() for i in b.params) for b in buckets)
    assert len(buckets) > 1
    with pytest.raises(ConfigError, match="bucket_bytes"):
        GradBuckets(params, bucket_bytes=0)


def test_a_bucket_is_ready_during_backward_as_soon_as_its_gradients_are_in():
    model = _model()
    seen_during_backward: list[tuple[int, bool]] = []
    first_layer_weight = list(model.parameters())[0]

    def on_ready(b: int, flat: np.ndarray) -> None:
        # the first layer's weight gradient comes last: earlier buckets are ready before it exists
        seen_during_backward.append((b, first_layer_weight.grad is not None))

    buckets = GradBuckets(list(model.parameters()), bucket_bytes=4 * 200, on_ready=on_ready)
    buckets.arm()
    _loss(model, *_batch()).backward()
    assert [b for b, _ in seen_during_backward] == list(range(len(buckets.buckets)))
    assert not seen_during_backward[0][1]  # the first bucket left before backward reached layer 0
    assert buckets.finish() == []


def _replicas_reduced(arrival: list[int], passes: int = 1) -> tuple[list[torch.Tensor], list[float]]:
    """WORLD replicas each take a shard (split again into ``passes`` micro-batches), fill their buckets,
    and send them to one reducer in the order ``arrival`` gives (a permutation of ranks, per bucket)."""
    x, y = _batch()
    replicas = [copy.deepcopy(_model()) for _ in range(WORLD)]
    sent: list[tuple[int, int, np.ndarray]] = []
    losses = []
    for rank, model in enumerate(replicas):
        buckets = GradBuckets(
            list(model.parameters()),
            bucket_bytes=4 * 200,
            on_ready=lambda b, flat, rank=rank: sent.append((rank, b, flat)),
            passes=passes,
        )
        buckets.arm()
        xs, ys = x.chunk(WORLD)[rank].chunk(passes), y.chunk(WORLD)[rank].chunk(passes)
        shard_loss = 0.0
        for xm, ym in zip(xs, ys, strict=True):
            loss = _loss(model, xm, ym) / passes
            loss.backward()
            shard_loss += loss.item()
        losses.append(shard_loss)
    reducer = BucketReducer(WORLD, len(buckets.buckets))
    by_bucket: dict[int, list[tuple[int, np.ndarray]]] = {}
    for rank, b, flat in sent:
        by_bucket.setdefault(b, []).append((rank, flat))
    for b, copies in by_bucket.items():
        copies = dict(copies)
        for rank in arrival:
            reducer.add(rank, b, copies[rank])
    assert reducer.complete
    target = GradBuckets(list(replicas[0].parameters()), bucket_bytes=4 * 200)
    for b, flat in reducer.reduced.items():
        target.assign(b, flat)
    return [p.grad.clone() for p in replicas[0].parameters()], losses


def test_the_reduction_equals_one_process_accumulating_the_shards():
    reference = _model()
    x, y = _batch()
    losses = []
    for xs, ys in zip(x.chunk(WORLD), y.chunk(WORLD), strict=True):
        loss = _loss(reference, xs, ys)
        (loss / WORLD).backward()
        losses.append(loss.item())
    grads, replica_losses = _replicas_reduced(list(range(WORLD)))
    np.testing.assert_allclose(replica_losses, losses, rtol=1e-6)
    for g, p in zip(grads, reference.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-7)


def test_the_result_is_bitwise_the_same_whatever_the_arrival_order():
    first, _ = _replicas_reduced(list(range(WORLD)))
    for arrival in itertools.islice(itertools.permutations(range(WORLD)), 1, None, 5):
        again, _ = _replicas_reduced(list(arrival))
        assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True)), arrival


def test_micro_batches_accumulate_before_a_bucket_is_sent():
    one, _ = _replicas_reduced(list(range(WORLD)), passes=1)
    three, _ = _replicas_reduced(list(range(WORLD)), passes=3)  # BATCH/WORLD = 3 rows: one per pass
    for a, b in zip(one, three, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_an_unused_parameter_is_sent_as_zeros_by_finish():
    model = _model()
    unused = torch.nn.Parameter(torch.ones(3))
    params = [unused, *model.parameters()]  # first registered: packed into the last bucket
    sent = {}
    buckets = GradBuckets(params, bucket_bytes=4 * 200, on_ready=lambda b, flat: sent.setdefault(b, flat))
    buckets.arm()
    _loss(model, *_batch()).backward()
    late = buckets.finish()
    assert late == [len(buckets.buckets) - 1]
    assert np.array_equal(sent[late[0]][-3:], np.zeros(3, np.float32))


def test_a_bucket_sent_twice_or_from_an_unknown_rank_is_an_error():
    reducer = BucketReducer(2, 1)
    reducer.add(0, 0, np.ones(4, np.float32))
    with pytest.raises(ConfigError, match="arrived twice"):
        reducer.add(0, 0, np.ones(4, np.float32))
    with pytest.raises(ConfigError, match="rank"):
        reducer.add(2, 0, np.ones(4, np.float32))
    assert np.array_equal(reducer.add(1, 0, 3 * np.ones(4, np.float32)), 2 * np.ones(4, np.float32))
