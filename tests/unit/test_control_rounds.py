"""plan_commit: which snapshot rounds commit when the pools acknowledge puts out of order, and a staged
durable checkpoint's step is waited for instead of being forgotten behind a newer commit."""

from __future__ import annotations

import logging

import pytest

from zetta_ray.checkpoint import Snapshot, TrickleCheckpoint
from zetta_ray.control.durable import DurableCheckpointer
from zetta_ray.control.recovery import Replica
from zetta_ray.control.rounds import SnapshotRound, plan_commit, restorable

pytestmark = pytest.mark.unit

UNITS = (0, 1)


def _round(step: int, *, stored: bool, lost: bool = False, partial: bool = False) -> SnapshotRound:
    return SnapshotRound(step, waiting={u: 0 if stored else 1 for u in UNITS}, partial=partial, lost=lost)


def _acked(*replicas: tuple[int, int | None]) -> dict[int, list[Replica]]:
    """Every unit holds the same (step, base) replicas in pool p0."""
    return {u: [Replica("p0", "n1", step, base) for step, base in replicas] for u in UNITS}


def test_a_record_stored_before_the_full_snapshot_it_builds_on_does_not_commit():
    full5 = _round(5, stored=False)  # still in flight
    record6 = _round(6, stored=True)
    acked = _acked((4, None), (6, 5))
    assert not restorable(record6, acked)
    plan = plan_commit([full5, record6], acked, committed=4)
    assert plan.step is None, "committing 6 would drop step 4, the only restorable state"
    assert plan.keep == (full5, record6)

    full5.waiting = {u: 0 for u in UNITS}
    plan = plan_commit([full5, record6], _acked((4, None), (5, None), (6, 5)), committed=4)
    assert plan.step == 6 and plan.keep == ()


def test_a_record_needs_every_record_between_it_and_its_base():
    acked = _acked((5, None), (7, 5))  # the record of step 6 has not landed
    assert not restorable(_round(7, stored=True), acked)
    assert restorable(_round(7, stored=True), _acked((5, None), (6, 5), (7, 5)))


def test_the_full_round_a_durable_checkpoint_waits_for_outlives_a_newer_commit():
    """The records of step 5 land, then step 6's full snapshots (a broken chain), and only then the full
    snapshots of step 5 that its durable checkpoint is made of: step 6 commits at once, and step 5's
    checkpoint is written when its snapshots land (before, it was dropped with a warning)."""
    records5, full5, full6 = _round(5, stored=True), _round(5, stored=False), _round(6, stored=True)
    acked = _acked((4, None), (5, 4), (6, None))
    plan = plan_commit([records5, full5, full6], acked, committed=4, wanted=[5])
    assert (plan.step, plan.abandoned, plan.keep) == (6, (), (full5,))
    assert plan.durable == (5,)  # the records of 5 are stored: tried, and it waits for the full ones

    full5.waiting = {u: 0 for u in UNITS}
    plan = plan_commit([full5], _acked((5, None), (6, None)), committed=6, wanted=[5])
    assert (plan.step, plan.durable, plan.keep) == (None, (5,), ())
    assert plan.abandoned == (5,)  # no round left: given up only if writing it just now did not take it


def test_a_wanted_round_stored_together_with_a_newer_one_still_gets_its_durable_checkpoint():
    """The controller takes in step 5's full snapshots and step 6's records in the same wait (it was busy
    for a while): step 6 commits, and step 5's checkpoint is written first. (The CI failure of
    tests/chaos/test_controller_restart.py: only the step-10 checkpoint existed.)"""
    records5, full5, records6 = _round(5, stored=True), _round(5, stored=True), _round(6, stored=True)
    acked = _acked((5, None), (6, 5))  # a full snapshot acknowledged over the record of the same step
    plan = plan_commit([records5, full5, records6], acked, committed=4, wanted=[5])
    assert (plan.step, plan.durable, plan.keep) == (6, (5,), ())


def test_without_a_durable_checkpoint_older_rounds_are_forgotten_behind_a_newer_commit():
    full5, full6 = _round(5, stored=False), _round(6, stored=True)
    plan = plan_commit([full5, full6], _acked((6, None)), committed=4)
    assert (plan.step, plan.keep) == (6, ())


def test_a_lost_round_of_a_wanted_step_is_abandoned_once_a_newer_one_commits():
    full5, full6 = _round(5, stored=False, lost=True), _round(6, stored=False)
    plan = plan_commit([full5, full6], _acked((4, None)), committed=4, wanted=[5])
    assert (plan.step, plan.abandoned) == (None, ()), "nothing newer is stored yet: keep waiting"
    assert plan.keep == (full5, full6)

    full6.waiting = {u: 0 for u in UNITS}
    plan = plan_commit([full5, full6], _acked((4, None), (6, None)), committed=4, wanted=[5])
    assert (plan.step, plan.durable, plan.abandoned, plan.keep) == (6, (), (5,), ())


def test_a_second_round_of_the_committed_step_writes_its_durable_checkpoint_without_committing_again():
    records5, full5 = _round(5, stored=True), _round(5, stored=False)
    plan = plan_commit([records5, full5], _acked((4, None), (5, 4)), committed=4, wanted=[5])
    assert (plan.step, plan.durable, plan.keep) == (5, (5,), (full5,))  # tried: no full ones yet

    full5.waiting = {u: 0 for u in UNITS}
    plan = plan_commit([full5], _acked((5, None)), committed=5, wanted=[5])
    assert (plan.step, plan.durable, plan.keep) == (None, (5,), ())


def test_partial_rounds_commit_for_their_units_and_do_not_forget_older_rounds():
    full5, replacement = _round(5, stored=False), _round(5, stored=True, partial=True)
    plan = plan_commit([full5, replacement], _acked((5, None)), committed=4)
    assert (plan.step, plan.partial, plan.keep) == (None, (replacement,), (full5,))


def test_abandoning_a_staged_checkpoint_warns_and_restores_the_schedule(tmp_path, caplog):
    config = TrickleCheckpoint(durable_uri=str(tmp_path / "ckpt"), durable_every=None, durable_interval_s=60)
    durable = DurableCheckpointer(config, deadline_s=5)
    try:
        assert not durable.due(5), "no interval has passed"
        dense = Snapshot(step=5, tensors={})
        durable.stage(5, dense)
        assert durable.wants(5) and durable.state.last_durable_step == 5
        with caplog.at_level(logging.WARNING, logger="zetta_ray.control.durable"):
            durable.abandon(5)
        assert "durable checkpoint of step 5 skipped" in caplog.text
        assert not durable.wants(5) and durable.state.last_durable_step == 0
        assert durable.due(5, force=True), "step 5 no longer counts as checkpointed"
    finally:
        durable.close()
