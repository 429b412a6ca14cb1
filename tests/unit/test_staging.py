"""Snapshots through shared-memory slots (actors/staging.py), in this process: a unit stages, a pool holds
views of the slot, and what the pool gives back restores a unit bit for bit."""

from __future__ import annotations

import copy
import os
import secrets

import numpy as np
import pytest
import torch

from zetta_ray.actors import ComputeUnit
from zetta_ray.actors.memory_pool import MemoryPool
from zetta_ray.actors.shm import _NAME, SHM_DIR
from zetta_ray.actors.staging import MIN_STAGED_BYTES, StagedArray, slot_name, unlink_slots
from zetta_ray.actors.wire import to_wire
from zetta_ray.experts import ExpertFFN

pytestmark = [
    pytest.mark.unit,
    pytest.mark.skipif(not os.path.isdir(SHM_DIR), reason="needs /dev/shm (Linux)"),
]


@pytest.fixture
def prefix():
    p = f"zetta_ray-{os.getpid()}-{secrets.token_hex(4)}"
    yield p
    unlink_slots(p + "-")


def _unit(seed: int = 0) -> ComputeUnit:
    torch.manual_seed(seed)
    experts = {(0, 0): ExpertFFN(64, 256), (0, 1): ExpertFFN(64, 256)}  # 128 KiB weights: staged
    unit = ComputeUnit(0, {k: copy.deepcopy(m).to("meta") for k, m in experts.items()})
    unit.load_state_dict(
        {f"{l}.{e}.{n}": to_wire(t) for (l, e), m in experts.items() for n, t in m.state_dict().items()}
    )
    unit.set_optimizer(torch.optim.AdamW, {"lr": 0.01})
    return unit


def _train_step(unit: ComputeUnit, step: int) -> None:
    g = torch.Generator().manual_seed(100 + step)
    x, dy = torch.randn(6, 64, generator=g), torch.randn(6, 64, generator=g)
    unit.zero_grad()
    unit.forward((step, 0, 0), [0, 1], [4, 2], x.numpy(), keep=True)
    unit.backward((step, 0, 0), dy.numpy())
    unit.step(step)


def _state(unit: ComputeUnit) -> dict[str, np.ndarray]:
    out = {f"p/{k}": v.copy() for k, v in unit.state_dict().items()}
    for i, s in unit.optimizer_state_dict()["state"].items():
        out |= {f"o/{i}/{k}": np.array(v) for k, v in s.items()}
    return out


def test_a_full_snapshot_and_records_through_slots_restore_bitwise(prefix):
    unit, pool = _unit(), MemoryPool(1 << 30, "pool-test")
    _train_step(unit, 0)
    full = unit.stage_snapshot(1, slot_name(prefix, 0, 0, "full", 0))
    # big arrays travel as slot offsets, small ones (AdamW's step counters, the RNG state) inline
    assert any(isinstance(v, StagedArray) for v in full.trees["tensors"].values())
    assert all(
        not isinstance(v, StagedArray) or v.nbytes >= MIN_STAGED_BYTES for v in full.trees["tensors"].values()
    )
    assert pool.put(0, 1, full) > 0
    for step in (1, 2):
        _train_step(unit, step)
        pool.put(0, step + 1, unit.stage_gradients(step + 1, slot_name(prefix, 0, 0, "record", step)))
    assert pool.stats()["slots"] == 3
    want = _state(unit)

    fresh = _unit(seed=1)  # other weights, same structure
    for step in (1, 2, 3):
        fresh.restore(pool.get(0, step))
    got = _state(fresh)
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].tobytes() == want[k].tobytes(), k
    assert fresh.steps_applied == unit.steps_applied == 3


def test_a_held_snapshot_is_a_view_of_its_slot_and_other_slots_leave_it_alone(prefix):
    unit, pool = _unit(), MemoryPool(1 << 30, "pool-test")
    _train_step(unit, 0)
    pool.put(0, 1, unit.stage_snapshot(1, slot_name(prefix, 0, 0, "full", 0)))
    held = {k: v.copy() for k, v in pool.get(0, 1).tensors.items()}
    _train_step(unit, 1)
    pool.put(0, 2, unit.stage_snapshot(2, slot_name(prefix, 0, 0, "full", 1)))  # another slot
    assert all(np.array_equal(pool.get(0, 1).tensors[k], v) for k, v in held.items())
    assert not all(np.array_equal(pool.get(0, 2).tensors[k], v) for k, v in held.items())
    # once dropped, the pool lets go of the slot's mapping; the slot can take the next snapshot
    assert pool.drop_before(0, 2) > 0
    assert pool.stats()["slots"] == 1
    _train_step(unit, 2)
    pool.put(0, 3, unit.stage_snapshot(3, slot_name(prefix, 0, 0, "full", 0)))
    assert pool.stats()["slots"] == 2 and pool.steps(0) == [2, 3]


def test_a_slot_too_small_grows_under_its_next_generation(prefix):
    unit, pool = _unit(), MemoryPool(1 << 30, "pool-test")
    name = slot_name(prefix, 0, 0, "full", 0)
    first = unit.stage_snapshot(0, name)  # before any optimizer step: no AdamW moments yet
    assert first.segment == name
    pool.put(0, 0, first)
    pool.drop_before(0, 1)
    _train_step(unit, 0)
    second = unit.stage_snapshot(1, name)  # the moments make it three times bigger
    assert second.segment == name[: -len(".0")] + ".1"
    assert not os.path.exists(os.path.join(SHM_DIR, name))  # the outgrown generation is removed
    pool.put(0, 1, second)
    assert np.array_equal(pool.get(0, 1).tensors["0.0.w1.weight"], unit.state_dict()["0.0.w1.weight"])


def test_slot_names_are_swept_with_their_controller_and_removed_by_prefix(prefix):
    unit = _unit()
    names = [slot_name(prefix, 0, 0, "record", i) for i in range(3)]
    for i, n in enumerate(names):
        _train_step(unit, i)
        unit.stage_gradients(i + 1, n)
    assert all(_NAME.match(n) for n in names)  # a dead controller's slots go with its other segments
    assert unlink_slots(prefix + "-") == 3
    assert not any(os.path.exists(os.path.join(SHM_DIR, n)) for n in names)


def test_a_unit_that_cannot_make_a_slot_returns_the_snapshot_itself(prefix, monkeypatch):
    """No /dev/shm, or one too small (docker's default 64 MB): the object-store path, from then on."""
    import zetta_ray.actors.staging as staging

    monkeypatch.setattr(staging, "SHM_DIR", os.path.join(SHM_DIR, "no-such-dir"))
    unit, pool = _unit(), MemoryPool(1 << 30, "pool-test")
    _train_step(unit, 0)
    blob = unit.stage_snapshot(1, slot_name(prefix, 0, 0, "full", 0))
    assert not isinstance(blob, staging.StagedSnapshot) and not unit.stages_in_shared_memory
    pool.put(0, 1, blob)
    assert pool.stats()["slots"] == 0
    monkeypatch.undo()  # later snapshots do not try again
    _train_step(unit, 1)
    assert not isinstance(
        unit.stage_gradients(2, slot_name(prefix, 0, 0, "record", 0)), staging.StagedSnapshot
    )


def test_slots_reserved_up_front_fit_the_records_and_adams_full_snapshots(prefix):
    unit = _unit()
    records = [slot_name(prefix, 0, 0, "record", i) for i in range(2)]
    full = [slot_name(prefix, 0, 0, "full", 0)]
    reserved = unit.reserve_slots(records, full)
    assert reserved > 0 and all(os.path.exists(os.path.join(SHM_DIR, n)) for n in records + full)
    _train_step(unit, 0)
    # neither grows: a record fits a record slot, the state with AdamW's two moments a full one
    assert unit.stage_gradients(1, records[0]).segment == records[0]
    assert unit.stage_snapshot(1, full[0]).segment == full[0]
    assert os.path.getsize(os.path.join(SHM_DIR, full[0])) < 4 * os.path.getsize(
        os.path.join(SHM_DIR, records[0])
    )


def test_a_unit_whose_arrays_all_travel_inline_still_stages(prefix):
    """A small model (every array under MIN_STAGED_BYTES) reserves slots of no payload: they must still be
    made (the unit once took the empty reservation for a full /dev/shm and left the slots for good)."""
    torch.manual_seed(0)
    experts = {(0, 0): ExpertFFN(8, 16)}
    unit = ComputeUnit(0, {k: copy.deepcopy(m).to("meta") for k, m in experts.items()})
    unit.load_state_dict(
        {f"{l}.{e}.{n}": to_wire(t) for (l, e), m in experts.items() for n, t in m.state_dict().items()}
    )
    unit.set_optimizer(torch.optim.AdamW, {"lr": 0.01})
    full = [slot_name(prefix, 0, 0, "full", 0)]
    unit.reserve_slots([], full)
    assert unit.stages_in_shared_memory and os.path.exists(os.path.join(SHM_DIR, full[0]))
    pool = MemoryPool(1 << 20, "pool-test")
    pool.put(0, 0, unit.stage_snapshot(0, full[0]))
    assert pool.stats()["slots"] == 1
