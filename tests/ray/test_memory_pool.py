"""MemoryPool actors hold snapshot replicas that outlive the unit that made them."""

from __future__ import annotations

import numpy as np
import pytest
import ray
from helpers import (
    UNIT_D,
    UNIT_KEYS,
    T,
    assert_same_units,
    load_units,
    train_units,
    unit_actor,
    wait_until_dead,
)

from zetta_ray.actors import ComputeUnit
from zetta_ray.actors.memory_pool import MemoryPool, MemoryPoolActor, PoolFullError, SnapshotNotHeldError
from zetta_ray.checkpoint import GRADIENT_RECORD, Snapshot, encode_snapshot
from zetta_ray.errors import ConfigError
from zetta_ray.experts import ExpertFFN

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_cluster")]


def _blob(step: int, nbytes: int) -> bytes:
    return encode_snapshot(Snapshot(step=step, tensors={"w": np.full(nbytes, step, np.uint8)}))


def test_put_get_steps_evict_and_limit_through_the_actor():
    size = len(_blob(1, 1000))
    pool = MemoryPoolActor.remote(limit_bytes=3 * size, name="pool-t")
    assert ray.get([pool.put.remote(0, s, _blob(s, 1000)) for s in (1, 2)], timeout=T) == [size, size]
    assert ray.get(pool.put.remote(1, 1, _blob(1, 1000)), timeout=T) == size
    assert ray.get(pool.get.remote(0), timeout=T) == _blob(2, 1000), "newest when no step is given"
    assert ray.get(pool.get.remote(0, 1), timeout=T) == _blob(1, 1000)
    # Full: unit 0's step 3 evicts its own oldest step only, never unit 1's.
    ray.get(pool.put.remote(0, 3, _blob(3, 1000)), timeout=T)
    assert ray.get([pool.steps.remote(0), pool.steps.remote(1)], timeout=T) == [[2, 3], [1]]
    with pytest.raises(PoolFullError, match=r"pool-t cannot hold the snapshot of unit 1 at step 2") as err:
        ray.get(pool.put.remote(1, 2, _blob(2, 3000)), timeout=T)
    assert err.value.limit == 3 * size and err.value.needed == len(_blob(2, 3000))
    assert ray.get(pool.steps.remote(1), timeout=T) == [1], "a put that cannot fit evicts nothing"
    with pytest.raises(
        SnapshotNotHeldError, match=r"no snapshot of unit 0 at step 1; it holds steps \[2, 3\]"
    ):
        ray.get(pool.get.remote(0, 1), timeout=T)
    assert ray.get(pool.drop_before.remote(0, 3), timeout=T) == size
    stats = ray.get(pool.stats.remote(), timeout=T)
    assert stats["bytes_used"] == 2 * size and stats["limit_bytes"] == 3 * size
    assert stats["keys"] == [(0, 3), (1, 1)] and stats["node_id"] == ray.get_runtime_context().get_node_id()
    assert ray.get(pool.ping.remote(), timeout=T) == "pool-t"
    ray.kill(pool)


def test_accounting_of_replacements_and_bad_puts_in_process():
    pool = MemoryPool(limit_bytes=10_000, name="p")
    a, b = _blob(1, 100), _blob(1, 900)
    pool.put("controller", 1, a)
    pool.put("controller", 1, b)  # the same key again: replaced, counted once
    assert pool.stats()["bytes_used"] == len(b) and pool.units() == ["controller"]
    pool.put(2, 5, bytearray(_blob(5, 10)))
    assert type(pool.get(2)) is bytes
    with pytest.raises(ValueError, match=r"put\(unit=2, step=6\) got the snapshot of step 5"):
        pool.put(2, 6, _blob(5, 10))
    with pytest.raises(SnapshotNotHeldError, match="at any step; it holds steps"):
        pool.get(3)
    with pytest.raises(ConfigError, match="limit_bytes=0"):
        MemoryPool(limit_bytes=0)


def test_a_record_never_replaces_a_full_snapshot_and_eviction_keeps_a_record_chain():
    def snap(step: int, n: int, record: bool) -> Snapshot:
        extra = {"kind": GRADIENT_RECORD} if record else {}
        return Snapshot(step=step, tensors={"w": np.zeros(n, np.uint8)}, extra=extra)

    pool = MemoryPool(limit_bytes=1_000, name="p")
    pool.put(0, 4, snap(4, 400, record=False))
    assert pool.put(0, 4, snap(4, 100, record=True)) == 400, "the full snapshot of step 4 stays"
    assert not pool.get(0, 4).is_gradient_record
    pool.put(0, 5, snap(5, 200, record=True))
    pool.put(0, 6, snap(6, 200, record=True))
    with pytest.raises(PoolFullError, match=r"after evicting unit 0's steps \[\], which it makes useless"):
        pool.put(0, 7, snap(7, 300, record=True))  # 4..6 are its chain: nothing may go
    assert pool.steps(0) == [4, 5, 6]
    pool.put(0, 7, snap(7, 400, record=False))  # a full snapshot: the older chain may go, oldest first
    assert pool.steps(0) == [5, 6, 7] and pool.stats()["bytes_used"] == 800
    pool.put(0, 8, snap(8, 300, record=True))  # its chain starts at 7: steps before it may go
    assert pool.steps(0) == [6, 7, 8]


def test_a_snapshot_held_by_pools_outlives_its_unit_and_restores_bitwise(start_pools):
    doomed, survivor = unit_actor(), unit_actor()
    pools = list(start_pools({"pool-0": None, "pool-1": None}).values())
    load_units([doomed, survivor])
    train_units([doomed, survivor], range(3))
    acks = ray.get(doomed.snapshot_to.remote(3, pools), timeout=T)  # the unit sends the snapshot itself
    nbytes = ray.get(acks, timeout=T)
    expected = ray.get(doomed.snapshot.remote(3), timeout=T)
    assert nbytes[0] == nbytes[1] == expected.nbytes > 0
    # Kill the unit that produced (and, through ray.put, owned) the object the pools hold, then fill
    # the object store so that memory Ray had freed would be reused: the pools' arrays must not change.
    ray.kill(doomed, no_restart=True)
    wait_until_dead(doomed)
    filler = [ray.put(np.full(2**24, 0xAB, np.uint8)) for _ in range(8)]
    del filler
    copies = ray.get([p.get.remote(0, 3) for p in pools], timeout=T)
    assert encode_snapshot(copies[0]) == encode_snapshot(copies[1]) == encode_snapshot(expected)
    replacement = unit_actor()
    assert ray.get(replacement.restore.remote(pools[1].get.remote(0)), timeout=T) == 3
    assert ray.get(replacement.ping.remote(), timeout=T)["steps_applied"] == 3
    # Encoded, the same copy restores in any process, this one included.
    local = ComputeUnit(0, {k: ExpertFFN(UNIT_D, 16).to("meta") for k in UNIT_KEYS})
    assert local.restore(encode_snapshot(copies[0])) == 3
    restored = ray.get(replacement.state_dict.remote(), timeout=T)
    assert all(np.array_equal(local.state_dict()[k], v) for k, v in restored.items())
    train_units([replacement, survivor], range(3, 5))
    assert_same_units(replacement, survivor)
    for actor in (replacement, survivor):
        ray.kill(actor)
