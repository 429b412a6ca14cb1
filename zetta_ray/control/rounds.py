"""Which snapshot rounds can be committed: a pure function of what the pools acknowledged.

A *round* is one ``FaultManager.snapshot`` call: every unit's snapshot of one step (or some units', for a
replacement), each sent to R pools. Pools run puts out of order (``MemoryPoolActor``): a put waits for
its blob, and small blobs resolve first. So acknowledgements arrive in any order, and two rules keep a
commit honest:

- **A round commits only when it can be restored.** Every unit's replicas of its step are stored, and
  each replica's pool also holds the full snapshot its chain starts from and every gradient record
  between (``restorable``). A record of step ``s + 1`` can be stored before the full snapshot of ``s``
  it builds on; committing ``s + 1`` then would drop the journal and the older replicas while nothing
  restorable is stored yet.
- **A durable checkpoint's step is waited for.** The newest committable round makes older rounds
  unnecessary for recovery, so they are forgotten, except a round of a step whose durable checkpoint
  is staged (``wanted``): that checkpoint is made of that round's full snapshots. It is kept until it is
  stored or one of its puts failed; a wanted step with no round left is ``abandoned``.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from zetta_ray.control.recovery import Replica

__all__ = ["CommitPlan", "SnapshotRound", "plan_commit", "restorable"]


@dataclass(slots=True, eq=False)
class SnapshotRound:
    """One snapshot call's puts: of ``step``, for the units in ``waiting``."""

    step: int
    waiting: dict[int, int] = field(default_factory=dict)  # unit -> acknowledgements still missing
    partial: bool = False  # some units only (a replacement's first snapshot), not every unit
    refused: list[str] = field(default_factory=list)  # why pools refused its full snapshots
    lost: bool = False  # a put failed, timed out or was abandoned: this round can never be complete

    @property
    def stored(self) -> bool:
        return not any(self.waiting.values())


@dataclass(frozen=True, slots=True)
class CommitPlan:
    """What to do with the rounds after taking in acknowledgements.

    Attributes:
        step: commit every unit's snapshots of this step (None: nothing new to commit).
        partial: rounds of some units only, stored: commit them for their units.
        durable: steps of stored rounds whose durable checkpoint is staged: write it now if every unit's
            full snapshot of the step is stored (a round of records is not enough), oldest first.
        abandoned: staged durable steps with no round left to wait for: once ``durable`` is written,
            any of them still staged will never have all its full snapshots stored.
        keep: the rounds still to wait for, in order.
    """

    step: int | None
    partial: tuple[SnapshotRound, ...]
    durable: tuple[int, ...]
    abandoned: tuple[int, ...]
    keep: tuple[SnapshotRound, ...]


def restorable(round_: SnapshotRound, acked: Mapping[int, Sequence[Replica]]) -> bool:
    """Whether every acknowledged replica of ``round_``'s step, of each of its units, has its whole chain
    (the full snapshot it starts from and each record up to it) acknowledged in its own pool."""
    for u in round_.waiting:
        held = {(r.pool, r.step) for r in acked.get(u, ())}
        for r in acked.get(u, ()):
            if r.step == round_.step and any((r.pool, s) not in held for s in range(r.start, r.step)):
                return False
    return True


def plan_commit(
    rounds: Sequence[SnapshotRound],
    acked: Mapping[int, Sequence[Replica]],
    *,
    committed: int,
    wanted: Collection[int] = (),
) -> CommitPlan:
    """The plan for ``rounds`` (in the order they were sent), given the replicas acknowledged so far,
    the newest step committed before (``committed``) and the steps whose durable checkpoint is staged
    (``wanted``). See the module docstring."""
    wanted = set(wanted)
    ready = [r for r in rounds if r.stored and restorable(r, acked)]
    whole = [r.step for r in ready if not r.partial]
    newest = max(whole, default=None)
    keep = [
        r
        for r in rounds
        if r not in ready
        # a newer round; or, not lost, a second round of the newest step (a durable's full one) or one
        # a staged durable checkpoint waits for
        and (newest is None or r.step > newest or (not r.lost and (r.step == newest or r.step in wanted)))
    ]
    return CommitPlan(
        step=newest if newest is not None and newest > committed else None,
        partial=tuple(r for r in ready if r.partial),
        durable=tuple(sorted({r.step for r in ready if not r.partial and r.step in wanted})),
        abandoned=tuple(sorted(s for s in wanted if not any(r.step == s for r in keep))),
        keep=tuple(keep),
    )
