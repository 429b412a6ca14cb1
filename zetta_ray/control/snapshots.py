"""Snapshot rounds: after a due step, every unit's state goes to R MemoryPools, as a full snapshot or a
gradient record.

A round is one ``Snapshots.take``: for each unit, where its snapshot goes (``decide_replica_nodes`` over
the live pools, decided again only when the pools change), whether it is full or a gradient record (a
record builds on the unit's chain: same pools, the step after the chain's last, fewer than
``full_every`` since its full snapshot, no put of it lost), and whether it travels through a
shared-memory slot (``slots.SlotLedger``) or the object store. The unit makes the blob once, owned by
this process; each target pool's ``put`` receives it, and ``commits.Commits`` takes in the
acknowledgements. Nobody waits, except for the step-0 snapshot (``wait=True``), so that a unit lost
before its first step can already be restored.

No Ray here: units and pools are called through their handles; waiting goes through ``Commits``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from zetta_ray.checkpoint import TrickleCheckpoint
from zetta_ray.control.commits import Commits, Put
from zetta_ray.control.pools import PoolSet
from zetta_ray.control.replicas import decide_replica_nodes
from zetta_ray.control.rounds import SnapshotRound
from zetta_ray.control.seams import Runtime
from zetta_ray.control.slots import SlotLedger
from zetta_ray.errors import RecoveryFailed

__all__ = ["Chain", "Snapshots"]

logger = logging.getLogger("zetta_ray.control.manager")  # the fault manager's log: one name for its parts

Targets = tuple[tuple[str, str], ...]  # (pool, node) pairs a snapshot goes to


@dataclass(frozen=True, slots=True)
class Chain:
    """A unit's gradient records build on its full snapshot of step ``base``, sent to ``targets``; the
    newest snapshot sent is of step ``last``."""

    base: int
    last: int
    targets: Targets


class Snapshots:
    """Sends snapshot rounds. See the module docstring."""

    def __init__(
        self,
        config: TrickleCheckpoint,
        *,
        deadline_s: float,
        pools: PoolSet,
        slots: SlotLedger,
        commits: Commits,
        unit_nodes: Sequence[str],
    ):
        self.config = config
        self.deadline_s = deadline_s
        self.pools = pools
        self.slots = slots
        self.commits = commits
        self.unit_nodes = unit_nodes  # the coordinator's list: recovery moves units in it
        self.chains: dict[int, Chain] = {}  # unit -> what its next gradient record would build on
        self._targets: dict[tuple[Any, ...], Targets] = {}
        self._degraded: set[tuple[int, bool, frozenset[str]]] = set()  # warned about (_warn_degraded)

    def take(
        self, runtime: Runtime, wait: bool = False, units: list[int] | None = None, full: bool = False
    ) -> None:
        """Ask every unit (or those in ``units``) for its state after ``runtime.step`` optimizer steps and
        store it on R pools. Ray runs the call after the calls sent so far, so a unit in the middle of a
        step (a replacement that was just replayed) is snapshotted as of its last optimizer step.

        A unit's snapshot is a gradient record when ``record_base`` allows (``full``, ``wait`` and
        ``units`` ask for full snapshots: a replacement mid-step has no gradients of the last step).
        ``wait`` blocks until the copies are stored (the step-0 snapshot does, so that a unit lost before
        its first step can already be restored)."""
        step = runtime.step
        if wait and units is None:
            self.reserve_slots(runtime)
        full = full or wait or units is not None
        round_ = SnapshotRound(step, partial=units is not None)
        now = time.monotonic()
        for u, unit in enumerate(runtime.units):
            if units is not None and u not in units:
                continue
            targets = self.replica_targets(u)
            base = None if full else self.record_base(u, step, targets)
            slot = self.slots.free_slot(u, self.unit_nodes[u], targets, full=base is None)
            if base is None:  # either way the blob is owned here; the unit writes it once, pools hold it
                base = step
                if slot is None:
                    blob = unit.snapshot.remote(step, False)
                else:
                    blob = unit.stage_snapshot.remote(step, self.slots.name(slot))
                self.commits.broken.discard(u)
            elif slot is None:
                blob = unit.gradient_record.remote(step, False)
            else:
                blob = unit.stage_gradients.remote(step, self.slots.name(slot))
            self.chains[u] = Chain(base, step, targets)
            round_.waiting[u] = len(targets)
            for pool, node in targets:
                ref = self.pools.handles[pool].put.remote(u, step, blob)
                self.commits.send(Put(u, step, pool, node, ref, now, round_, base, slot))
        self.commits.rounds.append(round_)
        if wait:
            self._wait_stored(round_)

    def _wait_stored(self, round_: SnapshotRound) -> None:
        """Wait until ``round_`` is stored; raise if a pool refused it or it is not stored in time."""
        step = round_.step
        deadline = time.monotonic() + self.deadline_s
        while not round_.stored and not round_.refused and time.monotonic() < deadline:
            self.commits.collect(wait_s=0.05)
        if round_.refused:
            raise RecoveryFailed(
                f"the step-{step} snapshot does not fit in the MemoryPool actors: {round_.refused[0]} "
                f"Raise TrickleCheckpoint(pool_bytes=...) (now {self.config.pool_bytes} bytes per pool; "
                "with AdamW a unit's full snapshot after its first step is about 3x its step-0 one), "
                "add nodes, or give fewer experts to each unit"
            )
        if not round_.stored:
            raise RecoveryFailed(
                f"the step-{step} snapshot was not stored within {self.deadline_s:g} s "
                f"(acknowledgements missing: {round_.waiting}); check the MemoryPool actors"
            )

    def reserve_slots(self, runtime: Runtime) -> None:
        """Have each unit that will stage its snapshots create all its slots before the first step (a
        slot's first use costs page faults; BENCHMARKS.md, issue 4). Once per unit; a replacement makes
        its slots as it needs them (its recovery should not wait for them)."""
        for u, unit in enumerate(runtime.units):
            targets = self.replica_targets(u)
            names = self.slots.reservation(u, self.unit_nodes[u], targets)
            if names is None:
                continue
            # Ray runs it before the snapshot that follows; records only where there will be any
            unit.reserve_slots.remote(names["record"] if self.config.every == 1 else [], names["full"])

    def record_base(self, u: int, step: int, targets: Targets) -> int | None:
        """The full snapshot that a gradient record of unit ``u``'s step ``step`` would build on, or None
        when the snapshot must be full: records are off (``full_every=1``, or ``every`` > 1 leaves steps
        without a record), the chain is ``full_every`` long, a put of it failed, its last snapshot is not
        of the step before, or its pools changed (a record is useless where its chain is not)."""
        chain = self.chains.get(u)
        if (
            self.config.every != 1
            or chain is None
            or u in self.commits.broken
            or chain.targets != targets
            or chain.last != step - 1
            or step - chain.base >= self.config.full_every
        ):
            return None
        return chain.base

    def replica_targets(self, u: int) -> Targets:
        """Where unit ``u``'s next snapshot goes; decided again only when the pools change.

        No cluster query on this per-step path: a pool whose put fails is checked and replaced, and
        recovery marks the pools of dead nodes, so the dead pools are what changes."""
        live_pools = self.pools.live()
        full_pools = self.commits.full_pools
        key = (u, self.unit_nodes[u], tuple(sorted(live_pools.items())), frozenset(full_pools))
        if key not in self._targets:
            full = full_pools
            if set(live_pools) <= full:  # every pool refused a snapshot lately: one may have room now
                full = set()
            targets = decide_replica_nodes(
                self.unit_nodes[u], live_pools, self.config.replicas, full_pools=full, key=u, quiet=True
            )
            self._targets[key] = targets
            self._warn_degraded(u, targets, live_pools)
        return self._targets[key]

    def _warn_degraded(self, u: int, targets: Targets, pools: dict[str, str]) -> None:
        """Warn once per situation (not once per unit) when unit ``u``'s snapshots get fewer than R
        replicas, or one on its own node."""
        own = any(n == self.unit_nodes[u] for _, n in targets)
        if len(targets) >= self.config.replicas and not own:
            return
        situation = (len(targets), own, frozenset(pools.values()))
        if situation in self._degraded:
            return
        self._degraded.add(situation)
        nodes = len(set(pools.values()))
        if own:
            logger.warning(
                "snapshots go to the MemoryPool on the unit's own node (unit %d, and others like it): "
                "TrickleCheckpoint(replicas=%d) needs %d other node(s) with a pool with room, and %d "
                "node(s) run one. A node failure loses its units and their snapshots together; add "
                "nodes for replicas that survive it",
                u,
                self.config.replicas,
                self.config.replicas,
                nodes,
            )
        else:
            logger.warning(
                "unit %d's snapshots (and others like it) go to %d other node(s), not "
                "TrickleCheckpoint(replicas=%d): %d node(s) run a MemoryPool. Add nodes or "
                "lower replicas",
                u,
                len(targets),
                self.config.replicas,
                nodes,
            )
