"""Fault records: what failed, where, and when, as data a recovery policy can decide on.

The runtime turns every failed or late remote call into a ``UnitFault`` (``UnitFailed``,
``DeadlineExceeded``; see ``zetta_ray.errors``). Recovery needs a little more than the exception: the
node the unit ran on, and whether the actor is gone or merely raised. ``Fault`` is that record, one per
thing to repair (a unit or a memory pool). A node's death becomes one fault per unit and per pool it
hosted (``faults_from_node_death``).

Kinds:

- ``"unit"``: the unit's actor died (process killed, crashed, out of memory). Replace it, restore its
  newest snapshot, replay its logged calls.
- ``"deadline"``: a call ran past its deadline; the actor may be alive but stalled. Kill it, then as
  ``"unit"``.
- ``"node"``: the node hosting the unit or pool died, and the replicas it held with it. As ``"unit"``
  or ``"pool"``.
- ``"pool"``: a MemoryPool actor died; the replicas it held are gone. Start a new pool.

A unit that *raised* an exception of its own (``raised=True``) is alive and deterministic: a
replacement replaying the same calls would raise the same error, so recovery fails fast on it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import ray.exceptions

from zetta_ray.errors import DeadlineExceeded, UnitFault

__all__ = ["PHASES", "Fault", "FaultKind", "PoolId", "fault_from_error", "faults_from_node_death"]

FaultKind = Literal["unit", "pool", "node", "deadline"]
PoolId = int | str  # whatever the controller names its MemoryPools by: an index or a name
PHASES = ("dispatch", "forward", "backward", "optimizer", "snapshot", "control")
_KINDS = ("unit", "pool", "node", "deadline")


@dataclass(frozen=True, slots=True, kw_only=True)
class Fault:
    """One failed actor: a unit (``unit`` set) or a memory pool (``pool`` set).

    Attributes:
        kind: ``"unit"``, ``"pool"``, ``"node"`` or ``"deadline"`` (see the module docstring).
        unit: index of the failed ComputeUnit, or None for a pool.
        experts: the (layer, expert) pairs the unit hosts (all of them: all are restored).
        node: the node id the actor ran on, when known.
        step: the step in progress (``ExpertRuntime.step``: optimizer steps completed so far).
        phase: one of ``PHASES``: what the controller was doing when it noticed.
        detail: the error's text, for the log.
        pool: the MemoryPool's id, for a pool fault.
        raised: the actor is alive and raised an exception of its own (not a death).
    """

    kind: FaultKind
    unit: int | None = None
    experts: tuple[tuple[int, int], ...] = ()
    node: str | None = None
    step: int
    phase: str
    detail: str = ""
    pool: PoolId | None = None
    raised: bool = False

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"Fault(kind={self.kind!r}) is invalid: use one of {_KINDS}")
        if self.phase not in PHASES:
            raise ValueError(f"Fault(phase={self.phase!r}) is invalid: use one of {PHASES}")
        if (self.unit is None) == (self.pool is None):
            raise ValueError(
                f"a Fault concerns exactly one actor: give unit= or pool=, not {self.unit=}, {self.pool=}"
            )
        if self.kind == "pool" and self.pool is None:
            raise ValueError("Fault(kind='pool') needs pool=<the MemoryPool's id>")
        if self.kind in ("unit", "deadline") and self.unit is None:
            raise ValueError(f"Fault(kind={self.kind!r}) needs unit=<the ComputeUnit's index>")

    @property
    def who(self) -> str:
        """``"unit 3 (experts [L0/E6, L0/E7])"`` or ``"pool 'pool-2'"``, plus the node when known."""
        if self.unit is not None:
            shown = ", ".join(f"L{layer}/E{expert}" for layer, expert in self.experts[:8])
            more = f" (+{len(self.experts) - 8} more)" if len(self.experts) > 8 else ""
            what = f"unit {self.unit} (experts [{shown}{more}])"
        else:
            what = f"pool {self.pool!r}"
        return f"{what} on node {self.node}" if self.node else what

    def describe(self) -> str:
        """One line for the log: who, what happened, when."""
        happened = {
            "unit": "raised an error" if self.raised else "died",
            "deadline": "missed its deadline",
            "node": "was lost with its node",
            "pool": "died",
        }[self.kind]
        detail = f": {self.detail}" if self.detail else ""
        return f"{self.who} {happened} at step {self.step}, phase {self.phase!r}{detail}"


def fault_from_error(err: UnitFault, *, node: str | None = None, node_alive: bool = True) -> Fault:
    """The record of a runtime error. ``node`` is where the unit ran; ``node_alive=False`` when that
    node is dead (the cluster says so, or its raylet does not answer): then the fault is a node fault,
    and its replicas there are gone too.
    """
    if isinstance(err, DeadlineExceeded):
        kind: FaultKind = "deadline"
        raised = False
    else:
        cause = getattr(err, "cause", None)
        # Ray's own errors (actor died, worker crashed, node died) mean the actor is gone; anything
        # else is the unit's own exception, carried to us inside a RayTaskError.
        raised = cause is not None and not (
            isinstance(cause, ray.exceptions.RayError) and not isinstance(cause, ray.exceptions.RayTaskError)
        )
        kind = "unit"
    if not node_alive:
        kind, raised = "node", False
    return Fault(
        kind=kind,
        unit=err.unit,
        experts=tuple(tuple(e) for e in err.experts),
        node=node,
        step=err.step,
        phase=err.phase,
        detail=str(err),
        raised=raised,
    )


def faults_from_node_death(
    node: str,
    *,
    units: Mapping[int, Sequence[tuple[int, int]]],
    pools: Iterable[PoolId] = (),
    step: int,
    phase: str,
) -> list[Fault]:
    """One ``"node"`` fault per unit (``units``: index -> its experts) and per pool the node hosted."""
    detail = f"node {node} died"
    out = [
        Fault(
            kind="node",
            unit=u,
            experts=tuple(tuple(e) for e in experts),
            node=node,
            step=step,
            phase=phase,
            detail=detail,
        )
        for u, experts in sorted(units.items())
    ]
    out += [
        Fault(kind="node", pool=p, node=node, step=step, phase=phase, detail=detail)
        for p in sorted(pools, key=str)
    ]
    return out
