"""Recovery carried out: a failed unit replaced, restored, replayed, and its calls re-sent.

``control/recovery.py`` decides (``decide_recovery``, pure); this module does what it decides, in these
steps (docs/recovery.md, "Recovering"):

1. ``lost_units``: the failed unit, and when its node is dead every other unit of that node. They are
   killed (dead already, or stalled), and the snapshot puts in flight are settled: what lands counts,
   what was made on or sent to the dead node is dropped (``settle_snapshots``).
2. ``start_replacement`` for every lost unit at once (a replacement's start, a fresh process importing
   torch, is most of a recovery), each on the spare, node or own bundle its decision names, and
   ``restore_snapshot``: the full snapshot, then the records after it, sent at once (Ray runs one
   caller's calls to an actor in order).
3. For each in turn: ``await_restore`` (a replica that cannot be read is marked dead and the decision
   taken again, up to ``_MAX_ATTEMPTS``), ``replay_journal`` (the calls since the restored step, by
   value), the replacement takes the unit's place, a snapshot of it is sent at once, and the calls the
   runtime waits for point at the replayed results or are re-sent (``resend_calls``).

If anything fails, every replacement already started is killed before ``RecoveryFailed`` goes up.

No Ray here: actors are started through the ``Runtime`` seam and killed, waited for and read through
the ``Cluster`` seam (``control/seams.py``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from zetta_ray.control.commits import Commits
from zetta_ray.control.faults import Fault, fault_from_error
from zetta_ray.control.liveness import Liveness
from zetta_ray.control.pools import PoolSet
from zetta_ray.control.recovery import RecoveryAction, RecoveryDecision, Replica, Spare, decide_recovery
from zetta_ray.control.replay import LoggedCall, ReplayLog
from zetta_ray.control.seams import Cluster, PendingCall, Runtime
from zetta_ray.control.slots import SlotLedger
from zetta_ray.control.snapshots import Snapshots
from zetta_ray.errors import RecoveryFailed, SnapshotNotHeldError, UnitFailed, UnitFault

__all__ = ["RecoveryEvent", "Repair"]

logger = logging.getLogger("zetta_ray.control.manager")  # the fault manager's log: one name for its parts

_MAX_ATTEMPTS = 5  # recoveries of one unit within one wait before giving up


@dataclass(frozen=True, slots=True)
class RecoveryEvent:
    """One fault and what was done about it, for reports and the chaos tool."""

    unit: int
    kind: str
    step: int
    phase: str
    action: str
    node: str | None
    restored_step: int | None
    replayed_calls: int
    redone_records: int  # optimizer steps redone from gradient records on top of a full snapshot
    recovery_s: float
    detail: str


@dataclass(slots=True)
class _Restoring:
    """A replacement that was started and sent its restore, not yet waited for."""

    new: Any
    node: str
    fault: Fault
    decision: RecoveryDecision
    restored: list[Any]  # one per snapshot restored: the full one, then the records after it


def _lost_with_node(runtime: Runtime, u: int, error: UnitFault) -> UnitFailed:
    """The fault of unit ``u``, lost because the node of ``error``'s unit died."""
    cause = RuntimeError(f"its node died with unit {error.unit} ({error})")
    return UnitFailed(
        unit=u, experts=runtime.layout.experts_of(u), step=error.step, phase=error.phase, cause=cause
    )


class Repair:
    """Carries out recoveries of one runtime's units. See the module docstring."""

    def __init__(
        self,
        *,
        deadline_s: float,
        start_deadline_s: float,
        cluster: Cluster,
        pools: PoolSet,
        slots: SlotLedger,
        liveness: Liveness,
        commits: Commits,
        snapshots: Snapshots,
        log: ReplayLog,
        unit_nodes: list[str],
        spares: list[tuple[dict[str, Any], str]],
    ):
        self.deadline_s = deadline_s
        self.start_deadline_s = start_deadline_s
        self.cluster = cluster
        self.pools = pools
        self.slots = slots
        self.liveness = liveness
        self.commits = commits
        self.snapshots = snapshots
        self.log = log
        self.unit_nodes = unit_nodes  # the coordinator's list: a replacement's node is written into it
        self.spares = spares  # (actor options of a reserved bundle, its node); a used one is removed
        self.events: list[RecoveryEvent] = []

    def recover(self, runtime: Runtime, error: UnitFault, calls: Sequence[PendingCall]) -> None:
        """Replace the failed unit of ``error`` and re-send its calls in ``calls``; raise if impossible.

        When the unit's node is dead, every other unit of that node is lost too: all their replacements
        start at once, so a node fault takes about as long as one unit's. Each replacement is restored
        before anything is replayed onto it; a replica that cannot be read (its pool or node died
        meanwhile) is marked dead and the decision is taken again.
        """
        start = time.monotonic()
        node = self.unit_nodes[error.unit]
        node_dead = node not in self.liveness.live_nodes(suspects=[node])
        lost = self.lost_units(error.unit, node_dead)
        for u in lost:
            self.cluster.kill(runtime.units[u])  # dead already, or stalled: either way it goes
        self.settle_snapshots(lost, node if node_dead else None)
        errors = {u: error if u == error.unit else _lost_with_node(runtime, u, error) for u in lost}
        alive = self.liveness.live_nodes()  # again: the wait for the puts may be long
        started: dict[int, _Restoring] = {}
        try:
            for u in lost:  # all replacements boot at the same time
                started[u] = self._begin(runtime, u, errors[u], alive)
            for u in lost:
                self._finish(runtime, u, errors[u], calls, start, started[u])
        except RecoveryFailed:
            for u, begun in started.items():  # no orphan actors when the job cannot go on
                if runtime.units[u] is not begun.new:
                    self.cluster.kill(begun.new)
            raise

    def lost_units(self, failed: int, node_dead: bool) -> list[int]:
        """The units to replace: ``failed`` and, when its node is dead, that node's other units."""
        node = self.unit_nodes[failed]
        lost = [failed]
        if node_dead:
            lost += [v for v, n in enumerate(self.unit_nodes) if n == node and v != failed]
        return lost

    def settle_snapshots(self, lost: list[int], dead_node: str | None) -> None:
        """Wait (up to the deadline) for the snapshots in flight; those that land count. A blob made on
        ``dead_node`` (or by a ``lost`` unit), or a put to a pool there, cannot answer, and Ray fails
        such a put only once it declares the node dead (about 15 s with its default health checks): they
        are dropped at once."""
        deadline = time.monotonic() + self.deadline_s
        self.commits.collect()
        if dead_node is not None:
            self.commits.drop_puts(lambda p: p.unit in lost or p.node == dead_node)
        while self.commits.puts and time.monotonic() < deadline:
            self.commits.collect(wait_s=0.05)

    def _begin(self, runtime: Runtime, u: int, error: UnitFault, alive: set[str] | None = None) -> _Restoring:
        """Decide where unit ``u`` goes, start its replacement and send the restore; do not wait.
        ``alive``: the live nodes, when the caller has just asked (else asked here)."""
        if alive is None:
            alive = self.liveness.live_nodes()
        old_node = self.unit_nodes[u]
        fault, decision = self.decide(u, error, alive)
        new, node = self.start_replacement(runtime, u, decision, old_node)
        return _Restoring(new, node, fault, decision, self.restore_snapshot(new, u, decision.restore_from))

    def decide(self, u: int, error: UnitFault, alive: set[str]) -> tuple[Fault, RecoveryDecision]:
        """The fault record and ``decide_recovery``'s decision for unit ``u``; raise on FAIL. The pools of
        nodes not ``alive`` are dead from now on."""
        old_node = self.unit_nodes[u]
        fault = fault_from_error(error, node=old_node, node_alive=old_node in alive)
        self.pools.mark_dead_off(alive)
        decision = decide_recovery(
            fault,
            live_nodes=alive,
            replicas_by_unit=self.commits.acked,
            spares=[Spare(i, node) for i, (_, node) in enumerate(self.spares)],
            dead_pools=self.pools.dead,
            log_start=self.log.first_step(u),
        )
        if decision.action is RecoveryAction.FAIL:
            raise RecoveryFailed(f"cannot recover unit {u}: {decision.reason}") from error
        return fault, decision

    def start_replacement(
        self, runtime: Runtime, u: int, decision: RecoveryDecision, old_node: str
    ) -> tuple[Any, str]:
        """Start unit ``u``'s replacement where ``decision`` says: its spare bundle (taken from the
        spares), its own bundle (free again) or pinned to another live node, asking for no CPU."""
        if decision.action is RecoveryAction.REPLACE_ON_SPARE:
            options, node = self.spares.pop(decision.spare.slot)
            return runtime.start_unit(u, **options), node
        if decision.node == old_node:
            return runtime.start_unit(u), old_node  # its own bundle is free again
        strategy = self.cluster.node_affinity(decision.node)
        return runtime.start_unit(u, num_cpus=0, resources=None, scheduling_strategy=strategy), decision.node

    def restore_snapshot(self, new: Any, u: int, replica: Replica) -> list[Any]:
        """Send ``new`` the restore of ``replica``: the full snapshot, then the records after it, each
        read from the replica's pool (Ray runs one caller's calls to an actor in order)."""
        pool = self.pools.handles[replica.pool]
        return [new.restore.remote(pool.get.remote(u, s)) for s in range(replica.start, replica.step + 1)]

    def await_restore(self, runtime: Runtime, u: int, error: UnitFault, begun: _Restoring) -> _Restoring:
        """Wait for unit ``u``'s restore; when it fails, kill the replacement and begin again from a
        new decision (the pool marked dead, or its copies of ``u`` forgotten), up to ``_MAX_ATTEMPTS``."""
        for attempt in range(_MAX_ATTEMPTS):
            if attempt:
                begun = self._begin(runtime, u, error)
            replica = begun.decision.restore_from
            try:
                self.cluster.get(begun.restored, self.start_deadline_s)
                return begun
            except self.cluster.failure as e:
                # The pool, or the replacement (slow to start, or dead on arrival): blame the pool only
                # if it does not answer, or its replica is gone for good.
                pool_gone = not self.pools.alive(replica.pool)
                logger.warning(
                    "restoring unit %d from %s failed (%s), trying again: %s",
                    u,
                    replica.pool,
                    "pool gone" if pool_gone else "pool alive",
                    str(e).splitlines()[0],
                )
                if pool_gone:
                    self.pools.dead.add(replica.pool)
                elif isinstance(getattr(e, "cause", None), SnapshotNotHeldError):
                    # a step of its chain is gone from that pool: none of the pool's copies is usable
                    self.commits.acked[u] = [
                        r for r in self.commits.acked.get(u, []) if r.pool != replica.pool
                    ]
                self.cluster.kill(begun.new)
        raise RecoveryFailed(f"unit {u}: no replica could be restored in {_MAX_ATTEMPTS} attempts") from error

    def replay_journal(self, new: Any, u: int, since: int) -> tuple[list[LoggedCall], dict[int, Any]]:
        """Send ``new`` unit ``u``'s journaled calls of steps ``>= since``, in order, by value (the
        replacement may run on another node than the shared memory the calls named, and must not pull
        rows from where their first copies went; see ``runtime.engine.by_value``). Returns the calls
        and their results by ``id`` of the journal's record."""
        replay = self.log.calls_for(u, since)
        fresh = {
            id(c): getattr(new, c.method).remote(*self.cluster.by_value(c.args, self.deadline_s))
            for c in replay
        }
        return replay, fresh

    @staticmethod
    def resend_calls(
        runtime: Runtime, u: int, calls: Sequence[PendingCall], fresh: dict[int, Any], since: int
    ) -> None:
        """Point unit ``u``'s calls in ``calls`` at their replayed results, or re-send those that were
        not journaled (their results are not in ``fresh``). A call sent before step ``since`` (the step
        of the restored snapshot) is neither: the dead unit answered it before it made that snapshot
        (one caller's calls run in order), and its effect is in the restored state; sending it again
        would apply it twice (an optimizer step that ran after a unit's last wait, for one)."""
        for c in calls:
            if c.unit != u:
                continue
            if c.logged is not None and id(c.logged) in fresh:
                c.ref = fresh[id(c.logged)]
            elif c.step >= since:
                runtime.resend(c)

    def _finish(
        self,
        runtime: Runtime,
        u: int,
        error: UnitFault,
        calls: Sequence[PendingCall],
        start: float,
        begun: _Restoring,
    ) -> None:
        """Wait for unit ``u``'s restore, replay its journal onto it, put it in the unit's place,
        snapshot it, and re-send its calls in ``calls``."""
        begun = self.await_restore(runtime, u, error, begun)
        new, node, fault, decision = begun.new, begun.node, begun.fault, begun.decision
        replica = decision.restore_from
        replay, fresh = self.replay_journal(new, u, decision.replay_since)
        runtime.units[u] = new
        self.unit_nodes[u] = node
        self.slots.retire(u)  # the dead unit's slots: the pool keeps what it holds mapped
        # Snapshot the replacement at once (Ray runs it after the replayed calls): until then its
        # newest stored state is the one just restored, and losing it again would replay more.
        if replica.step < runtime.step:
            self.snapshots.take(runtime, units=[u])
        self.resend_calls(runtime, u, calls, fresh, since=replica.step)
        self._record(u, error, fault, decision, node, len(replay), time.monotonic() - start)

    def _record(
        self,
        u: int,
        error: UnitFault,
        fault: Fault,
        decision: RecoveryDecision,
        node: str,
        replayed: int,
        took_s: float,
    ) -> None:
        """Keep the ``RecoveryEvent`` of unit ``u``'s recovery and log it."""
        replica = decision.restore_from
        self.events.append(
            RecoveryEvent(
                unit=u,
                kind=fault.kind,
                step=error.step,
                phase=error.phase,
                action=decision.action.value,
                node=node,
                restored_step=replica.step,
                replayed_calls=replayed,
                redone_records=replica.step - replica.start,
                recovery_s=took_s,
                detail=str(error),
            )
        )
        logger.warning(
            "recovered unit %d (%s in %s at step %d) on node %s from snapshot %d (%d gradient records "
            "redone), replaying %d calls",
            u,
            fault.kind,
            error.phase,
            error.step,
            node[:8],
            replica.step,
            replica.step - replica.start,
            replayed,
        )
