"""Gradient buckets for data-parallel dense replicas: filled during backward, reduced in a fixed order.

The first piece of issue 18's data parallelism, and the part that fixes its numbers. A dense replica (a
unit that holds a copy of the model's dense parameters and trains on one shard of the batch) groups its
parameters into buckets of about ``bucket_bytes`` each, in reverse registration order, because backward
produces the last layers' gradients first (the order PyTorch's DDP uses). ``GradBuckets.arm`` hooks every
parameter (``register_post_accumulate_grad_hook``); the moment the last gradient of a bucket is
accumulated, the bucket is flattened into one float32 numpy array and handed to ``on_ready``, so that its
transfer can start while backward is still computing the earlier layers. With gradient accumulation
(``passes`` backward passes per step, one per micro-batch) a bucket is ready after its last pass.

``BucketReducer`` is the receiving side: it takes each replica's copy of each bucket in whatever order
they arrive and, once it holds all ``world`` copies of a bucket, sums them in replica order (0, 1, ...)
and divides by ``world``. The sum's order never depends on arrival order, so a run is bitwise the same
from run to run with the same mesh. The step's loss is the mean of the shard losses, so the mean of
the shard gradients is the gradient of that loss: equal, up to float rounding, to one process that
accumulates ``(loss_i / world).backward()`` over the shards (tests/unit/test_grad_buckets.py).

``BucketInbox`` holds the copies that peers send until the reduction takes them (one thread receives,
another reduces) and ``reduce_into`` writes the means into ``.grad`` (``dense_replica.py`` uses them).

Pure PyTorch and numpy, no Ray: the transport between replicas (issue 18 chooses it by measurement) is
whatever ``on_ready`` does with the array.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from zetta_ray.checks import check, positive_int

__all__ = ["Bucket", "BucketInbox", "BucketReducer", "GradBuckets", "reduce_into"]


@dataclass(frozen=True, slots=True)
class Bucket:
    """Parameters ``params`` (indices into the replica's parameter list, in the order they are packed)
    and their element count."""

    index: int
    params: tuple[int, ...]
    numel: int


def plan_buckets(params: Sequence[torch.Tensor], bucket_bytes: int) -> list[Bucket]:
    """Buckets of about ``bucket_bytes`` (float32) over ``params`` in reverse order; a parameter larger
    than a bucket gets one of its own. The same parameters give the same buckets on every replica."""
    buckets: list[Bucket] = []
    current: list[int] = []
    numel = 0
    for i in reversed(range(len(params))):
        n = params[i].numel()
        if current and (numel + n) * 4 > bucket_bytes:
            buckets.append(Bucket(len(buckets), tuple(current), numel))
            current, numel = [], 0
        current.append(i)
        numel += n
    if current:
        buckets.append(Bucket(len(buckets), tuple(current), numel))
    return buckets


class GradBuckets:
    """One replica's gradient buckets. See the module docstring.

    Args:
        params: the replica's trainable parameters, in registration order (the same on every replica).
        bucket_bytes: the size a bucket fills to before the next starts (float32 bytes).
        on_ready: called as ``on_ready(bucket_index, flat)`` when a bucket's gradients are all in.
        passes: backward passes per step (micro-batches); a bucket is ready after the last.
    """

    def __init__(
        self,
        params: Sequence[torch.nn.Parameter],
        *,
        bucket_bytes: int = 25 * 2**20,
        on_ready: Callable[[int, np.ndarray], None] | None = None,
        passes: int = 1,
    ):
        positive_int("GradBuckets.bucket_bytes", bucket_bytes)
        positive_int("GradBuckets.passes", passes)
        check(len(params) > 0, "GradBuckets.params", len(params), "needs at least one parameter")
        self.params = list(params)
        self.buckets = plan_buckets(self.params, bucket_bytes)
        self.on_ready = on_ready
        self.passes = passes
        self._bucket_of = {p: b.index for b in self.buckets for p in b.params}
        self._seen = [0] * len(self.buckets)  # gradient arrivals this step, per bucket
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self.ready_order: list[int] = []  # buckets handed to on_ready this step, in order

    def arm(self) -> None:
        """Hook every parameter so that full buckets go to ``on_ready`` during backward."""
        self.disarm()
        for i, p in enumerate(self.params):
            self._handles.append(p.register_post_accumulate_grad_hook(self._hook(i)))

    def disarm(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, i: int) -> Callable[[torch.Tensor], None]:
        def accumulated(_: torch.Tensor) -> None:
            b = self._bucket_of[i]
            self._seen[b] += 1
            if self._seen[b] == self.passes * len(self.buckets[b].params):
                self.ready_order.append(b)
                if self.on_ready is not None:
                    self.on_ready(b, self.flatten(b))

        return accumulated

    def finish(self) -> list[int]:
        """After the step's last backward: hand ``on_ready`` every bucket not handed yet (it holds a
        parameter the step did not use, whose hook never fired; its gradient counts as zeros), in
        bucket order. Returns those buckets."""
        late = [b.index for b in self.buckets if b.index not in self.ready_order]
        for b in late:
            self.ready_order.append(b)
            if self.on_ready is not None:
                self.on_ready(b, self.flatten(b))
        return late

    def reset(self) -> None:
        """Start a new step: no bucket has any gradient yet."""
        self._seen = [0] * len(self.buckets)
        self.ready_order = []

    def flatten(self, b: int) -> np.ndarray:
        """Bucket ``b``'s gradients as one float32 array (a parameter without a gradient counts zeros)."""
        parts = []
        for i in self.buckets[b].params:
            p = self.params[i]
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            parts.append(g.detach().reshape(-1).to(torch.float32))
        return torch.cat(parts).numpy()

    def assign(self, b: int, flat: np.ndarray) -> None:
        """Write ``flat`` (a reduced bucket ``b``) into its parameters' ``.grad``."""
        bucket = self.buckets[b]
        check(flat.shape == (bucket.numel,), f"bucket {b}", flat.shape, f"must have shape ({bucket.numel},)")
        at = 0
        values = torch.from_numpy(np.ascontiguousarray(flat))
        for i in bucket.params:
            p = self.params[i]
            n = p.numel()
            p.grad = values[at : at + n].reshape(p.shape).to(p.dtype).clone()
            at += n


class BucketReducer:
    """Collects ``world`` replicas' copies of each bucket and reduces each bucket, once complete, to the
    mean of the copies, summed in replica order. See the module docstring."""

    def __init__(self, world: int, n_buckets: int):
        positive_int("BucketReducer.world", world)
        positive_int("BucketReducer.n_buckets", n_buckets)
        self.world = world
        self.n_buckets = n_buckets
        self._held: dict[int, dict[int, np.ndarray]] = {}
        self.reduced: dict[int, np.ndarray] = {}

    def add(self, rank: int, bucket: int, flat: np.ndarray) -> np.ndarray | None:
        """Take replica ``rank``'s copy of ``bucket``; return the reduced bucket when this was its last
        copy, else None."""
        check(0 <= rank < self.world, "rank", rank, f"must be in [0, {self.world})")
        check(0 <= bucket < self.n_buckets, "bucket", bucket, f"must be in [0, {self.n_buckets})")
        held = self._held.setdefault(bucket, {})
        check(rank not in held, f"bucket {bucket} from rank", rank, "arrived twice in one step")
        held[rank] = flat
        if len(held) < self.world:
            return None
        total = held[0].astype(np.float32, copy=True)
        for r in range(1, self.world):  # replica order, whatever the arrival order
            total += held[r]
        total /= np.float32(self.world)
        del self._held[bucket]
        self.reduced[bucket] = total
        return total

    @property
    def complete(self) -> bool:
        """Whether every bucket of this step is reduced."""
        return len(self.reduced) == self.n_buckets

    def reset(self) -> None:
        """Start a new step (nothing held; a copy left over means a replica sent a bucket twice)."""
        self._held = {}
        self.reduced = {}


class BucketInbox:
    """Where a unit's copies of its peers' buckets wait, keyed by (epoch, pass) then (rank, bucket);
    ``put`` runs on the thread that receives them, ``take`` on the one that reduces. Thread-safe."""

    def __init__(self) -> None:
        self._held: dict[tuple[int, int], dict[tuple[int, int], np.ndarray]] = {}
        self._arrived = threading.Condition()
        self.last_arrival = 0.0  # time.perf_counter() of the newest copy

    def put(self, epoch: int, passes: int, rank: int, bucket: int, flat: np.ndarray) -> None:
        with self._arrived:
            self._held.setdefault((epoch, passes), {})[(rank, bucket)] = flat
            self.last_arrival = time.perf_counter()
            self._arrived.notify_all()

    def take(
        self,
        key: tuple[int, int],
        world: int,
        n_buckets: int,
        deadline_s: float,
        late: Callable[[list[int]], Exception],
    ) -> dict[tuple[int, int], np.ndarray]:
        """All ``world`` copies of the ``n_buckets`` buckets of ``key``, once in (older keys of the same
        epoch or before are dropped: superseded). After ``deadline_s`` raises ``late(missing ranks)``."""
        end = time.monotonic() + deadline_s
        with self._arrived:
            while len(self._held.get(key, {})) < world * n_buckets:
                left = end - time.monotonic()
                if left <= 0:
                    have = self._held.get(key, {})
                    raise late(
                        sorted({r for r in range(world) for b in range(n_buckets) if (r, b) not in have})
                    )
                self._arrived.wait(left)
            copies = self._held.pop(key)
            for old in [k for k in self._held if k[0] <= key[0]]:
                del self._held[old]
        return copies


def reduce_into(buckets: GradBuckets, copies: dict[tuple[int, int], np.ndarray], world: int) -> None:
    """Reduce every bucket's ``world`` copies (``copies[(rank, bucket)]``) in replica order and write the
    means into the parameters' ``.grad``."""
    reducer = BucketReducer(world, len(buckets.buckets))
    for b in range(len(buckets.buckets)):
        for r in range(world):
            reducer.add(r, b, copies[(r, b)])
        buckets.assign(b, reducer.reduced[b])
