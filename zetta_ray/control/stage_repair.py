"""Recovery of a pipeline stage from its trickle snapshot and a replay of the pipeline's calls.

A pipeline stage has no sibling to copy: its layers are its own. What it has is the snapshot of its
state that it handed to MemoryPool actors after the last snapshotted optimizer step (``StageGroup.base``)
and the controller's journal of every call since. The stages of a step depend on each other (a
micro-batch's activations go forward through all of them, its gradients back), so when stage ``s``
dies or stalls, ``StageRepair`` (the ``StageGroup``'s supervisor, ``runtime/stages.py``) takes the
whole pipeline back to ``base`` (with data parallelism, every replica's pipeline: their stages exchange
gradients at each step; every replica's stage ``s`` restores the one snapshot of stage ``s``):

1. ``abort``: every live stage stops the run it is in (it waits for the dead stage's activations or
   gradients and would otherwise wait until its deadline); queued calls run and are redone below. A
   stage that does not answer is dead too (a node that held several stages);
2. ``restart``: kills each dead stage and starts a replacement in its bundle, from the same layers;
3. ``reconnect``: every stage learns the new peer list;
4. ``restore``: every stage (the replacement after its optimizer is set) loads its own snapshot of
   ``base`` from a pool; the bytes go pool to stage;
5. ``replay``: every journaled call is sent again to every stage, each run with its micro-batches fed
   again, and the journal's ``Call``s now point at the new results.

Runs draw dropout from (seed, replica, stage, run, micro-batch), so a replayed run computes bitwise what the
original did and the final state is the fault-free one (tests/ray/test_pipeline_faults.py). The live
stages redo the step too: that is the price of a recovery that needs no copy of activations.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from zetta_ray.errors import RecoveryFailed, UnitFault
from zetta_ray.runtime.calls import wait_for
from zetta_ray.runtime.stages import StageGroup

__all__ = ["StageRecovery", "StageRepair"]


@dataclass(frozen=True, slots=True)
class StageRecovery:
    """One stage rebuilt: which, in what phase, from the snapshot of which step, what was redone."""

    unit: int
    rebuilt: tuple[int, ...]  # the stages restarted: ``unit`` and any other found dead with it
    phase: str
    kind: str  # the fault's class name
    snapshot_step: int
    replayed_calls: int
    recovery_s: float


class StageRepair:
    """The supervisor of a ``StageGroup`` that keeps snapshots: see the module docstring."""

    def __init__(self) -> None:
        self.events: list[StageRecovery] = []

    def __call__(self, group: StageGroup, fault: UnitFault) -> None:
        start = time.monotonic()
        s = fault.unit - group.first_unit
        if not 0 <= s < group.world:
            raise fault
        if group.base is None:
            raise RecoveryFailed(
                f"unit {s} failed ({fault}) before any snapshot of its stage was in a pool; nothing "
                "to rebuild it from"
            ) from fault
        dead = self._abort_live(group, s)
        for r in dead:
            group.restart(r)
        wait_for(group.each("connect", "control", group.mesh()), group.cfg.start_deadline_s)
        if group.optimizer_args is not None:
            setup = [group.call(r, "set_optimizer", "control", *group.optimizer_args) for r in dead]
            wait_for(setup, group.cfg.start_deadline_s)
        # live stages restore after the calls queued before the fault: they run (aborted) and are redone
        wait_for(group.each("restore_from", "control", group.base, group.pools), 2 * group.cfg.deadline_s)
        group.replay()
        self.events.append(
            StageRecovery(
                unit=fault.unit,
                rebuilt=tuple(group.first_unit + r for r in dead),
                phase=fault.phase,
                kind=type(fault).__name__,
                snapshot_step=group.base,
                replayed_calls=len(group.journal),
                recovery_s=time.monotonic() - start,
            )
        )

    @staticmethod
    def _abort_live(group: StageGroup, s: int) -> list[int]:
        """Abort every stage but ``s``; returns ``s`` and the stages that do not answer (dead too: a node
        that held several stages)."""
        dead = [s]
        for r in range(group.world):
            if r != s:
                try:
                    wait_for([group.call(r, "abort", "control")], group.cfg.deadline_s)
                except UnitFault:
                    dead.append(r)
        return sorted(dead)
