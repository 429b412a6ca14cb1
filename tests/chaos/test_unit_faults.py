"""Chaos on one node: kill a unit in each phase, SIGKILL its process from outside, stall it past its
deadline, kill a MemoryPool. Training goes on, and the final state equals a fault-free run bit for bit."""

from __future__ import annotations

import logging
import os
import signal
import time

import pytest
import ray
import torch
from helpers import tiny_config
from ray.util.placement_group import placement_group_table
from ray.util.state import list_actors

import zetta_ray as zr
from zetta_ray.errors import RecoveryFailed

pytestmark = pytest.mark.chaos

STEPS = 6
FAULT_STEP = 3


@pytest.fixture(scope="module")
def cluster_with_dashboard(start_ray):
    """The state API (list_actors) needs the dashboard, so this module starts its own cluster."""
    start_ray(include_dashboard=True)


def _batch(step: int) -> torch.Tensor:
    return torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(100 + step % 3))


def _train(fault=None, runtime=None, checkpoint=None) -> tuple[dict[str, torch.Tensor], list]:
    """Six AdamW steps; ``fault(dmodel, step, phase)`` runs at every step before forward, before backward
    and after the optimizer step (it acts where it wants)."""
    torch.manual_seed(0)
    model = zr.MoETransformer(tiny_config())
    with zr.parallelize(model, zr.ExpertParallel(degree=4), runtime=runtime, checkpoint=checkpoint) as dm:
        opt = dm.optimizer(torch.optim.AdamW, lr=1e-2)
        for step in range(STEPS):
            b = _batch(step)
            opt.zero_grad()
            if fault:
                fault(dm, step, "forward")
            _, loss = dm(b[:, :-1], b[:, 1:])
            if fault:
                fault(dm, step, "backward")
            loss.backward()
            opt.step()
            if fault:
                fault(dm, step, "optimizer")
        return dm.state_dict(), dm.recoveries


@pytest.fixture(scope="module")
def fault_free(cluster_with_dashboard, one_thread):
    state, recoveries = _train()
    assert recoveries == []
    return state


def _actors(**filters: str) -> list:
    """Ray's state API, asked about this module's cluster by address (several clusters may run here)."""
    address = ray.get_runtime_context().gcs_address
    return list_actors(address=address, filters=[(k, "=", v) for k, v in filters.items()])


def _assert_same(state, reference):
    assert list(state) == list(reference)
    for key in reference:
        assert torch.equal(state[key], reference[key]), key


def _no_leftovers():
    deadline = time.monotonic() + 20
    while True:
        alive = [a for a in _actors(state="ALIVE") if a.class_name in ("ComputeUnit", "MemoryPool")]
        groups = [g for g in placement_group_table().values() if g["state"] != "REMOVED"]
        if not alive and not groups:
            return
        assert time.monotonic() < deadline, (alive, groups)
        time.sleep(0.2)


@pytest.mark.parametrize("rows", ["inline", "shared_memory"])
@pytest.mark.parametrize("phase", ["forward", "backward", "optimizer"])
def test_unit_killed_in_each_phase(fault_free, phase, rows):
    """``rows``: this model's rows are small enough to travel inline with the calls; with
    ``shared_memory_min_bytes=0`` they go through shared memory, and the replay onto the replacement
    (which may run anywhere) is sent by value (``actors.shm.portable``)."""

    slots = []

    def kill(dm, step, now):
        if (step, now) == (FAULT_STEP, phase):
            # one node: the snapshots went to the pool through shared-memory slots (actors/staging.py)
            slots.append((dm.faults.stage_prefix, dm.faults.slots_in_use))
            ray.kill(dm.unit_handle(1), no_restart=True)

    runtime = zr.RuntimeConfig(shared_memory_min_bytes=0) if rows == "shared_memory" else None
    state, recoveries = _train(kill, runtime=runtime)
    _assert_same(state, fault_free)
    ((prefix, busy),) = slots
    assert busy > 0
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(prefix)]  # removed at close
    assert len(recoveries) == 1 and recoveries[0].unit == 1
    assert recoveries[0].restored_step >= FAULT_STEP - 1  # at most one step of work redone
    # restored from the full snapshot of step 0 and the gradient records after it (full_every=8)
    assert recoveries[0].redone_records == recoveries[0].restored_step > 0
    _no_leftovers()


def test_snapshots_through_the_object_store_when_memory_is_not_shared(fault_free):
    """``shared_memory=False``: no slots; the units' snapshots go through Ray's object store."""
    used = []

    def kill(dm, step, now):
        if (step, now) == (FAULT_STEP, "backward"):
            used.append(dm.faults.slots_in_use)
            ray.kill(dm.unit_handle(2), no_restart=True)

    state, recoveries = _train(kill, runtime=zr.RuntimeConfig(shared_memory=False))
    _assert_same(state, fault_free)
    assert used == [0] and len(recoveries) == 1 and recoveries[0].redone_records > 0
    _no_leftovers()


def test_full_snapshots_every_step_recover_without_records(fault_free):
    def kill(dm, step, now):
        if (step, now) == (FAULT_STEP, "backward"):
            ray.kill(dm.unit_handle(3), no_restart=True)

    state, recoveries = _train(kill, checkpoint=zr.TrickleCheckpoint(full_every=1))
    _assert_same(state, fault_free)
    assert [(r.unit, r.redone_records) for r in recoveries] == [(3, 0)]
    assert recoveries[0].restored_step >= FAULT_STEP - 1
    _no_leftovers()


def test_replacement_killed_in_the_same_step_redoes_at_most_one_step(fault_free):
    """A replacement is snapshotted as soon as its replay is sent: losing it again right away goes back
    to that snapshot, not to the older one the first recovery restored."""

    def kill_twice(dm, step, now):
        if (step, now) in ((2, "backward"), (2, "optimizer")):
            ray.kill(dm.unit_handle(1), no_restart=True)

    state, recoveries = _train(kill_twice)
    _assert_same(state, fault_free)
    assert [r.unit for r in recoveries] == [1, 1]
    for r in recoveries:
        assert r.restored_step >= r.step - 1, r  # at most one step of work redone, each time
    _no_leftovers()


def test_unit_process_sigkilled_from_outside(fault_free):
    def sigkill(dm, step, now):
        if (step, now) == (FAULT_STEP, "backward"):
            units = _actors(class_name="ComputeUnit", state="ALIVE")
            assert len(units) == 4, units
            os.kill(units[0].pid, signal.SIGKILL)  # found by Ray's state API, not by asking zetta_ray

    state, recoveries = _train(sigkill)
    _assert_same(state, fault_free)
    assert len(recoveries) == 1
    _no_leftovers()


def test_stalled_unit_is_replaced_after_its_deadline(fault_free):
    def stall(dm, step, now):
        if (step, now) == (FAULT_STEP, "forward"):
            ray.get(dm.unit_handle(2).inject_delay.remote("backward", 300.0), timeout=30)

    start = time.monotonic()
    state, recoveries = _train(stall, runtime=zr.RuntimeConfig(deadline_s=4.0))
    _assert_same(state, fault_free)
    assert [(r.unit, r.kind, r.phase) for r in recoveries] == [(2, "deadline", "backward")]
    assert time.monotonic() - start < 120
    _no_leftovers()


def test_memory_pool_killed_then_a_unit(fault_free):
    def kill_pool_then_unit(dm, step, now):
        if (step, now) == (2, "forward"):  # the only pool on this node: every replica is gone
            ray.kill(next(iter(dm.faults.pools.values())), no_restart=True)
        if (step, now) == (4, "backward"):  # recovery needs the snapshot stored in the new pool
            ray.kill(dm.unit_handle(0), no_restart=True)

    state, recoveries = _train(kill_pool_then_unit)
    _assert_same(state, fault_free)
    assert len(recoveries) == 1 and recoveries[0].unit == 0
    _no_leftovers()


# -- pools too small (TrickleCheckpoint.pool_bytes) ------------------------------------------------------


def _unit_param_bytes() -> int:
    """Parameter bytes of one unit's experts (a gradient record is about this, a full AdamW snapshot
    about three times it)."""
    model = zr.MoETransformer(tiny_config())
    experts = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".experts." in n)
    return experts // 4


def test_pools_that_cannot_hold_the_first_snapshot_fail_at_once_naming_the_fix(fault_free):
    """Four units' step-0 snapshots (each about one unit's parameters) in a pool of twice that: the
    error comes at parallelize, names the setting to raise, and nothing is left running."""
    config = zr.TrickleCheckpoint(pool_bytes=2 * _unit_param_bytes())
    start = time.monotonic()
    with pytest.raises(RecoveryFailed, match=r"step-0 snapshot does not fit.*TrickleCheckpoint\(pool_bytes"):
        _train(checkpoint=config)
    assert time.monotonic() - start < 30  # not the 60 s deadline of a snapshot that never lands
    _no_leftovers()


def test_pools_that_never_hold_every_units_full_snapshot_stop_training_naming_the_fix(fault_free):
    """Room for the step-0 snapshots but never for four AdamW full snapshots: training stops within two
    chains' worth of steps, instead of going on with nothing committed and the journal growing."""
    torch.manual_seed(0)
    config = zr.TrickleCheckpoint(full_every=2, pool_bytes=6 * _unit_param_bytes())
    with zr.parallelize(
        zr.MoETransformer(tiny_config()), zr.ExpertParallel(degree=4), checkpoint=config
    ) as dm:
        opt = dm.optimizer(torch.optim.AdamW, lr=1e-2)
        with pytest.raises(RecoveryFailed, match=r"no snapshot was committed.*pool_bytes") as failed:
            for step in range(12):
                b = _batch(step)
                opt.zero_grad()
                _, loss = dm(b[:, :-1], b[:, 1:])
                loss.backward()
                opt.step()
        assert dm.step <= 2 * 2 + 3, failed.value  # patience: 2 x full_every steps past the last commit
    _no_leftovers()


def test_tight_pools_fall_back_to_full_snapshots_and_recovery_stays_bitwise(fault_free, caplog):
    """Room for every unit's full snapshot but not for a chain of records beside it: pools refuse
    records, chains break, training goes on; a kill then still ends bit for bit where the fault-free
    run does."""

    def kill(dm, step, now):
        if (step, now) == (STEPS - 1, "backward"):
            ray.kill(dm.unit_handle(1), no_restart=True)

    config = zr.TrickleCheckpoint(pool_bytes=14 * _unit_param_bytes())
    with caplog.at_level(logging.INFO, logger="zetta_ray.control.manager"):
        state, recoveries = _train(kill, checkpoint=config)
    _assert_same(state, fault_free)
    refused = [r for r in caplog.records if "has no room for a gradient record" in r.getMessage()]
    assert refused, "the pool had room for every record: this test tests nothing"
    assert [r.unit for r in recoveries] == [1]
    _no_leftovers()


def test_one_node_warns_once_that_replicas_share_the_units_node(fault_free, caplog):
    """Four units on the one node, R=2: one warning that names the situation and the fix, not one per
    unit (the main job printed four identical ones)."""
    with caplog.at_level(logging.WARNING, logger="zetta_ray"):
        state, _ = _train()
    _assert_same(state, fault_free)
    warned = [r.getMessage() for r in caplog.records if "unit's own node" in r.getMessage()]
    assert len(warned) == 1, warned
    assert "replicas=2" in warned[0] and "add nodes" in warned[0]
