"""Recovery of a data-parallel dense replica from a live sibling: no checkpoint is read.

Replicas apply the same reduced gradients to the same parameters, so after every step each holds bitwise
what the others hold. When replica ``r`` dies or stalls, ``SiblingRepair`` (the ``ReplicaGroup``'s
supervisor, ``runtime/replicas.py``):

1. ``restart``: kills it and starts a replacement in its bundle (the same node);
2. ``reconnect``: tells every replica the new peer list; each live one sends the replacement its own
   gradient buckets of this epoch, which its predecessor received and took with it;
3. ``copy_sibling``: reads a live sibling's state (parameters, optimizer state, steps applied, gradient
   epoch; served while the sibling may wait in its reduction for the dead replica's buckets) and loads
   it into the replacement, optimizer first;
4. ``replay``: finds in the journal the first call the sibling's state has not absorbed (its steps and
   epoch tell: ``ReplicaGroup.state_after``) and sends the replacement every journaled call from there
   with the dead replica's own arguments (its shard), pointing the dead replica's ``Call``s at the new
   results. A call before that point needs nothing redone (the sibling's state includes it): a forward
   keeps its result (it was answered, or the sibling could not have stepped past it), the rest answer
   ``None``. The replayed backward sends the replacement's buckets, which unblocks the siblings.

Dropout draws from a seed of (run seed, rank, epoch, pass), so a replayed forward draws what the original
did and the run stays bitwise the fault-free one (tests/ray/test_data_parallel_faults.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from zetta_ray.errors import RecoveryFailed, UnitFault
from zetta_ray.runtime.calls import wait_for
from zetta_ray.runtime.replicas import ReplicaGroup

__all__ = ["ReplicaRecovery", "SiblingRepair"]


@dataclass(frozen=True, slots=True)
class ReplicaRecovery:
    """One replica rebuilt: which, from which sibling, at what state, what was redone, how long."""

    unit: int
    phase: str
    kind: str  # the fault's class name
    sibling: int
    steps_applied: int
    replayed_calls: int
    recovery_s: float


class SiblingRepair:
    """The supervisor of a ``ReplicaGroup``: rebuilds a failed replica from a live sibling."""

    def __init__(self) -> None:
        self.events: list[ReplicaRecovery] = []

    def __call__(self, group: ReplicaGroup, fault: UnitFault) -> None:
        start = time.monotonic()
        r = fault.unit - group.first_unit
        if not 0 <= r < group.world:
            raise fault
        inner = getattr(fault, "cause", None)
        if isinstance(inner, UnitFault) and inner.experts and group.experts_failed is not None:
            group.experts_failed(inner)  # a shared expert unit failed, not the replica: its owner repairs
            return
        siblings = [s for s in range(group.world) if s != r]
        if not siblings:
            raise RecoveryFailed(
                f"replica {r} failed ({fault}) and has no sibling to be rebuilt from: with "
                "DataParallel(degree=1) there is no live copy of the model"
            ) from fault
        sibling = siblings[0]
        group.restart(r)
        self._reconnect(group, r)
        state = self._copy_sibling(group, r, sibling)
        replayed = self._replay(group, r, (state["steps_applied"], state["epoch"]))
        self.events.append(
            ReplicaRecovery(
                unit=fault.unit,
                phase=fault.phase,
                kind=type(fault).__name__,
                sibling=sibling,
                steps_applied=state["steps_applied"],
                replayed_calls=replayed,
                recovery_s=time.monotonic() - start,
            )
        )

    @staticmethod
    def _reconnect(group: ReplicaGroup, r: int) -> None:
        calls = [group.call(s, "connect", "control", group.actors, r) for s in range(group.world)]
        wait_for(calls, group.cfg.start_deadline_s)

    @staticmethod
    def _copy_sibling(group: ReplicaGroup, r: int, sibling: int) -> dict[str, Any]:
        state = wait_for([group.call(sibling, "state", "control")], group.cfg.deadline_s)[0]
        setup = []
        if group.optimizer_args is not None:
            setup.append(group.call(r, "set_optimizer", "control", *group.optimizer_args))
        setup.append(group.call(r, "load_state", "control", state))
        wait_for(setup, group.cfg.start_deadline_s)
        return state

    @staticmethod
    def _replay(group: ReplicaGroup, r: int, absorbed: tuple[int, int]) -> int:
        journal = group.journal
        start = next((i for i in range(len(journal) + 1) if group.state_after(i) == absorbed), None)
        if start is None:
            raise RecoveryFailed(
                f"replica {r}'s sibling is at (steps {absorbed[0]}, epoch {absorbed[1]}), which no point "
                f"of the journal (from {group.settled}, {len(journal)} calls) reaches; the replicas "
                "diverged"
            )
        for entry in journal[:start]:
            if entry.method != "forward":
                group.answer(entry.calls[r], None)
        for entry in journal[start:]:
            group.resend(entry.calls[r])
        return len(journal) - start
