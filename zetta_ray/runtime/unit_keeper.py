"""UnitKeeper: trickle snapshots of the expert units that data-parallel replicas share, and their rollback.

The fault manager (``control/``) recovers an expert unit by replaying the calls the controller sent it.
Expert units shared by replicas get their forward and backward calls from the replicas, which the
controller does not journal, so they recover another way: after every optimizer step each unit hands
its snapshot to MemoryPool actors (``ComputeUnit.snapshot_to``: unit to pool, not through this process),
and when one fails every expert unit goes back to the newest step whose snapshots all pools
acknowledged (``base``), the dead one restarted first; the replicas then redo the step's forward and
backward (``ReplicaGroup.rewind``). Going back is the step's start, since the controller only steps the
units once every replica's backward is in and waits for that step and its snapshots before the replicas
step, so no replica ever runs ahead of the units' ``base``.
Touches Ray: ``.remote`` calls to the units and pools, ``ray.wait`` / ``ray.kill`` (a dead unit).
"""

from __future__ import annotations

from typing import Any

import ray

from zetta_ray.errors import RecoveryFailed, UnitFault
from zetta_ray.runtime.calls import Call, wait_for
from zetta_ray.runtime.engine import ExpertRuntime
from zetta_ray.runtime.unit_pools import unkept

__all__ = ["UnitKeeper"]

_PING_S = 5.0  # a unit that does not answer a ping in this long is taken for dead


class UnitKeeper:
    """Snapshots of ``runtime``'s units in ``pools`` after every step; see the module docstring."""

    def __init__(self, runtime: ExpertRuntime, pools: list[Any]):
        self.runtime = runtime
        self.pools = pools
        self.base: int | None = None  # the newest step every unit's snapshot is held at
        self._pending: tuple[int, list[Call]] | None = None

    def snapshot(self, step: int) -> None:
        """Every unit hands its state after ``step`` steps to the pools (sent now, checked at ``settle``)."""
        calls = [
            Call(
                ref=unit.snapshot_to.remote(step, self.pools), unit=u, experts=[], step=step, phase="snapshot"
            )
            for u, unit in enumerate(self.runtime.units)
        ]
        self._pending = (step, calls)

    def settle(self, deadline_s: float) -> None:
        """Wait for the last snapshots; once one pool holds each unit's, their step is ``base``. A unit
        that failed is a ``UnitFault``; a pool that failed is logged (another may hold the snapshot)."""
        if self._pending is None:
            return
        step, calls = self._pending
        acks = wait_for(calls, deadline_s)
        missing = unkept(acks, deadline_s, f"the expert snapshot of step {step}")
        if missing:
            raise RecoveryFailed(f"no pool kept expert units {missing}' snapshots of step {step}")
        self._pending = None
        self.base = step

    def roll_back(self, deadline_s: float) -> list[int]:
        """Restart every unit that does not answer, then load every unit's snapshot of ``base`` and count
        steps from there; returns the units restarted."""
        if self.base is None:
            raise RecoveryFailed("an expert unit failed before the first snapshot of the units was kept")
        runtime = self.runtime
        pings = [unit.ping.remote() for unit in runtime.units]
        answered = set(ray.wait(pings, num_returns=len(pings), timeout=_PING_S)[0])
        dead = []
        for u, ping in enumerate(pings):
            try:
                if ping in answered:
                    ray.get(ping, timeout=0)
                    continue
            except ray.exceptions.RayError:
                pass
            ray.kill(runtime.units[u], no_restart=True)
            runtime.units[u] = runtime.start_unit(u)
            dead.append(u)
        self._pending = None
        pool = self.pools[0]  # each pool holds every unit's snapshot; the first that answers serves
        snapshots = [pool.get.remote(u, self.base) for u in range(len(runtime.units))]
        try:
            runtime.restore(snapshots, self.base, runtime.grad_epoch)
        except UnitFault as fault:
            raise RecoveryFailed(
                f"expert units could not be rolled back to step {self.base}: {fault}"
            ) from fault
        return dead

    def close(self) -> None:
        for pool in self.pools:
            ray.kill(pool, no_restart=True)
        self.pools = []
