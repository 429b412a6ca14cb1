"""Acknowledgements and commits: which snapshot replicas are stored, and what that makes unnecessary.

Every snapshot a unit sends to a pool is a ``Put`` in flight. ``Commits.collect`` takes in the puts that
finished: a stored one is an acknowledged ``Replica`` (``acked``); a refused one (``PoolFullError``)
marks its pool full until the next commit; a failed one breaks the unit's record chain and, when the
pool does not answer, has the pool replaced. Then ``rounds.plan_commit`` (pure) says what to commit:
the newest round every unit's replicas of which are stored and restorable drops the journal's older
calls (``ReplayLog.commit``) and the pools' older copies (``drop_before``, which frees their slots once
answered), and a round a staged durable checkpoint waits for has that checkpoint written.

No Ray here: results are waited for and read through the ``Cluster`` seam (``control/seams.py``); the
pools are called through their handles.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from zetta_ray.checkpoint import TrickleCheckpoint
from zetta_ray.control.durable import DurableCheckpointer
from zetta_ray.control.liveness import Liveness
from zetta_ray.control.pools import PoolSet
from zetta_ray.control.recovery import Replica
from zetta_ray.control.replay import ReplayLog
from zetta_ray.control.rounds import SnapshotRound, plan_commit
from zetta_ray.control.seams import Cluster
from zetta_ray.control.slots import SlotKey, SlotLedger
from zetta_ray.errors import PoolFullError, RecoveryFailed

__all__ = ["Commits", "Put"]

logger = logging.getLogger("zetta_ray.control.manager")  # the fault manager's log: one name for its parts


@dataclass(slots=True)
class Put:
    """One snapshot sent to one pool, not yet acknowledged."""

    unit: int
    step: int
    pool: str
    node: str
    ref: Any
    sent: float
    round: SnapshotRound
    base: int  # the step of the full snapshot it restores from: ``step`` itself, or a record's chain start
    slot: SlotKey | None = None  # the shared-memory slot the unit copied it into (actors/staging.py)


class Commits:
    """The puts in flight, the replicas stored, and the newest committed step. See the module docstring."""

    def __init__(
        self,
        config: TrickleCheckpoint,
        *,
        deadline_s: float,
        cluster: Cluster,
        pools: PoolSet,
        slots: SlotLedger,
        liveness: Liveness,
        log: ReplayLog,
        durable: DurableCheckpointer | None,
    ):
        self.config = config
        self.deadline_s = deadline_s
        self.cluster = cluster
        self.pools = pools
        self.slots = slots
        self.liveness = liveness
        self.log = log
        self.durable = durable
        self.acked: dict[int, list[Replica]] = {}
        self.committed_step = -1  # the newest step whose snapshots are stored on all their replicas
        self.full_pools: set[str] = set()  # refused a full snapshot since the last commit: tried last
        self.refused: dict[int, str] = {}  # unit -> why a pool refused its full snapshot since the commit
        self.broken: set[int] = set()  # units whose chain lost a put: their next snapshot is full
        self.puts: list[Put] = []
        self.rounds: list[SnapshotRound] = []

    def send(self, put: Put) -> None:
        """Count ``put`` as in flight (its slot, if any, is busy until its pool drops it)."""
        self.puts.append(put)
        if put.slot is not None:
            self.slots.hold(put.slot, put.pool, put.unit, put.step)

    def check_room(self, step: int) -> None:
        """Raise when full snapshots have been refused for lack of room and nothing was committed for
        two chains' worth of steps: the pools cannot hold every unit's state at once, and going on would
        leave the job without a recent snapshot or a durable checkpoint (the journal growing meanwhile)."""
        since = max(self.committed_step, 0)
        if self.refused and step - since > 2 * self.config.full_every * self.config.every:
            units = sorted(self.refused)
            raise RecoveryFailed(
                f"no snapshot was committed in the {step - since} steps since step {since}: the MemoryPool "
                f"actors have no room for the full snapshots of units {units} ({self.refused[units[0]]}). "
                f"Raise TrickleCheckpoint(pool_bytes=...) (now {self.config.pool_bytes} bytes per pool), "
                "add nodes, or give fewer experts to each unit; the last durable checkpoint, if any, is "
                "intact"
            )

    def collect(self, wait_s: float = 0.0) -> None:
        """Take in finished puts; a put past the deadline or failed is logged and not counted. Then
        commit what is stored (see the module docstring)."""
        self.slots.release()
        if not self.puts:
            return
        done = set(self.cluster.ready([p.ref for p in self.puts], wait_s))
        now = time.monotonic()
        still = []
        for put in self.puts:
            if put.ref not in done:
                if now - put.sent > self.deadline_s:
                    self._lose(put, "timed out")
                else:
                    still.append(put)
                continue
            try:
                self.cluster.get(put.ref, self.deadline_s)
            except PoolFullError as e:
                self._refused_put(put, e)
                continue
            except self.cluster.failure as e:
                self._failed_put(put, e)
                continue
            self.acknowledge(put)
            put.round.waiting[put.unit] -= 1
        self.puts = still
        wanted = [s.step for s in self.durable.staged] if self.durable is not None else []
        plan = plan_commit(self.rounds, self.acked, committed=self.committed_step, wanted=wanted)
        self.rounds = list(plan.keep)
        for r in plan.partial:
            self.commit(r.step, units=list(r.waiting))
        for step in plan.durable:  # oldest first: writing a newer one gives up on older staged ones
            self.write_durable(step)
        for step in plan.abandoned:
            self.durable.abandon(step)
        if plan.step is not None:
            self.commit(plan.step)

    def _refused_put(self, put: Put, e: PoolFullError) -> None:
        """``put``'s pool had no room for it: a record breaks its chain; a full snapshot marks the pool
        full until the next commit (and ``check_room`` stops the job if that lasts)."""
        self.slots.forget(put.pool, put.unit, put.step)
        self._lose(put, None)
        why = str(getattr(e, "cause", e))  # the pool's own message, without Ray's traceback
        if put.base != put.step:
            # a record that does not fit beside its chain: the next full snapshot may evict it
            logger.info("pool %s has no room for a gradient record: %s", put.pool, why)
            return
        self.full_pools.add(put.pool)
        put.round.refused.append(why)
        if put.unit not in self.refused:
            logger.warning(
                "unit %d's full snapshot of step %d does not fit in pool %s; until one fits, "
                "nothing newer is committed: %s",
                put.unit,
                put.step,
                put.pool,
                why,
            )
        self.refused[put.unit] = why

    def _failed_put(self, put: Put, e: Exception) -> None:
        """``put`` was not stored: the pool or the blob failed. A pool that does not answer is replaced."""
        self.slots.forget(put.pool, put.unit, put.step)
        self._lose(put, f"failed: {str(e).splitlines()[0]}")
        # Not proof the pool died: the unit that made the blob may be the one that did.
        if put.pool not in self.pools.dead and not self.pools.alive(put.pool):
            self.slots.forget_pool(put.pool)  # it holds nothing now
            self.pools.replace(put.pool, self.liveness.live_nodes)

    def acknowledge(self, put: Put) -> None:
        """Count ``put``'s replica as stored. A pool keeps a full snapshot over a record of the same step
        (``MemoryPool.put``), and so does this count."""
        held = self.acked.setdefault(put.unit, [])
        same = [r for r in held if r.pool == put.pool and r.step == put.step]
        if any(r.start == r.step for r in same):
            return
        held[:] = [r for r in held if r not in same]
        held.append(Replica(put.pool, put.node, put.step, put.base))

    def drop_puts(self, doomed: Callable[[Put], bool]) -> None:
        """Stop waiting for the puts in flight that ``doomed(put)`` says will never land; like failed
        puts, they are not counted as stored (their round stays incomplete, a later one commits)."""
        kept = []
        for put in self.puts:
            if doomed(put):
                self._lose(put, "abandoned: its unit's or pool's node is dead")
            else:
                kept.append(put)
        self.puts = kept

    def _lose(self, put: Put, why: str | None) -> None:
        """``put`` will not be stored: its unit's record chain is broken (the next snapshot is full) and
        its round incomplete. ``why`` is logged as a warning (None: the caller says it)."""
        self.broken.add(put.unit)
        put.round.lost = True
        if why is not None:
            logger.warning("snapshot of unit %d step %d to %s %s", put.unit, put.step, put.pool, why)

    def commit(self, step: int, units: list[int] | None = None) -> None:
        """Drop what the snapshots of ``step`` (of every unit, or of ``units``) make unnecessary: older
        journal calls and older copies (only in the pools that hold them)."""
        if units is not None:
            for u in units:
                self.log.commit(step, unit=u)
            self.drop_stale(step, units)
            return
        self.log.commit(step)
        self.committed_step = max(self.committed_step, step)
        self.full_pools.clear()  # the drops below free room: a pool that refused may take the next one
        self.refused.clear()
        self.drop_stale(step, list(self.acked))

    def write_durable(self, step: int) -> None:
        """Write the durable checkpoint staged for ``step`` if every unit's full snapshot of ``step`` is
        stored (a step whose units sent records gets its full snapshots from ``stage_durable``)."""
        if self.durable is None or not self.durable.wants(step):
            return
        full = {u: [r for r in rs if r.step == step == r.start] for u, rs in self.acked.items()}
        if all(full.values()):
            fetch = {  # sent now, so that a later drop_before cannot overtake them
                u: [self.pools.handles[r.pool].get.remote(u, step) for r in rs] for u, rs in full.items()
            }
            self.durable.commit(step, fetch)

    def drop_stale(self, step: int, units: list[int]) -> None:
        """Forget the replicas that restoring ``step`` does not need: those before the full snapshot that
        each unit's replicas of ``step`` start from, and before the oldest step a staged durable
        checkpoint is still to be made of."""
        floor = [min(s.step for s in self.durable.staged)] if self.durable and self.durable.staged else []
        stale = set()
        for u in units:
            replicas = self.acked.get(u, [])
            keep = min((r.start for r in replicas if r.step == step), default=step)
            keep = min([keep, *floor])
            stale |= {(r.pool, u, keep) for r in replicas if r.step < keep and r.pool not in self.pools.dead}
            self.acked[u] = [r for r in replicas if r.step >= keep]
        in_flight = {(p.pool, p.unit, p.step) for p in self.puts}
        for pool, u, keep in sorted(stale):
            drop = self.pools.handles[pool].drop_before.remote(u, keep)  # housekeeping; only slots wait
            self.slots.free_after(drop, pool, u, keep, in_flight)
