"""ActorGroup: what the controller's side of a group of unit actors shares: calls that return at once,
and the one wait, where a failed unit goes to the group's supervisor (when it has one) and the wait goes
on. ``ReplicaGroup`` (data-parallel replicas) and ``StageGroup`` (pipeline stages) are groups.
Touches Ray: ``.remote`` calls, ``ray.put``, ``ray.kill``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ray

from zetta_ray.config import RuntimeConfig
from zetta_ray.errors import UnitFault
from zetta_ray.runtime.calls import Call, wait_for

__all__ = ["ActorGroup"]


class ActorGroup:
    """``world`` unit actors (``actors``, by rank); rank ``r`` is unit ``first_unit + r`` in faults."""

    def __init__(self, world: int, cfg: RuntimeConfig, options: list[dict[str, Any]], first_unit: int = 0):
        self.world = world
        self.cfg = cfg
        self.options = list(options)
        self.first_unit = first_unit
        self.step = 0  # optimizer steps submitted
        self.actors: list[Any] = []
        self.supervisor: Callable[[Any, UnitFault], None] | None = None
        self.max_recoveries = 3  # per wait

    def call(self, r: int, method: str, phase: str, *args: Any) -> Call:
        """``method(*args)`` on unit ``r``; returns at once. Not journaled: for reads and set-up."""
        ref = getattr(self.actors[r], method).remote(*args)
        unit = self.first_unit + r
        return Call(ref=ref, unit=unit, experts=[], step=self.step, phase=phase, method=method, args=args)

    def each(self, method: str, phase: str, *args: Any) -> list[Call]:
        """``method(*args)`` on every unit, in rank order; returns at once. Not journaled."""
        return [self.call(r, method, phase, *args) for r in range(self.world)]

    def wait(self, calls: list[Call], start: bool = False) -> list[Any]:
        """The calls' results, within the deadline (``start``: the start-up deadline). A unit that dies
        or stalls is rebuilt by the supervisor (when there is one) and the wait goes on."""
        deadline = self.cfg.start_deadline_s if start else self.cfg.deadline_s
        for attempt in range(self.max_recoveries + 1):
            try:
                return wait_for(calls, deadline)
            except UnitFault as fault:
                if self.supervisor is None or attempt == self.max_recoveries:
                    raise
                self.supervisor(self, fault)
                for c in calls:  # the journal's calls now point at the replacement; ask it the rest
                    if c.logged is None and c.unit == fault.unit:
                        self.resend(c)
        raise AssertionError("unreachable")

    def resend(self, call: Call) -> None:
        """Send ``call`` again to its unit's actor now (a replacement); ``call`` points at the result."""
        call.ref = getattr(self.actors[call.unit - self.first_unit], call.method).remote(*call.args)

    def answer(self, call: Call, value: Any) -> None:
        """Point ``call`` at ``value``: what a replacement need not redo answers as if it had."""
        call.ref = ray.put(value)

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
