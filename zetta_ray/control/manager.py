"""The fault manager: carries out trickle checkpointing and recovery for one ``ExpertRuntime``.

``FaultManager`` is a thin coordinator of small parts, each a module of ``control/`` with one job:

- ``pools.PoolSet``: the MemoryPool actors (start one per live node, replace a dead one);
- ``slots.SlotLedger``: the shared-memory snapshot slots, busy until their pool dropped them;
- ``liveness.Liveness``: which nodes are alive (a suspect node's raylet asked directly);
- ``snapshots.Snapshots``: snapshot rounds sent (targets, full or record, slot or object store);
- ``commits.Commits``: acknowledgements taken in, rounds committed, stale copies dropped;
- ``repair.Repair``: recovery carried out (start_replacement, restore_snapshot, replay_journal ...);
- ``durable_writes.DurableWrites``: durable checkpoints staged and finished.

The decisions come from the pure policies beside them (``decide_replica_nodes``, ``decide_recovery``,
``plan_commit``, ``ReplayLog``). The parts reach Ray only through the seams of ``control/seams.py``;
``control/ray_cluster.py`` is the real ``Cluster``, which this module builds unless one is given (the
unit tests give a fake). The protocol (docs/recovery.md):

1. Every call that changes a unit's state is journaled before it is sent (the runtime's ``journal``).
2. After every ``every``-th optimizer step the manager asks each unit for a snapshot (sent right after
   the unit's ``step`` call, so it captures exactly that state) and has R MemoryPool actors on other
   nodes copy it. Nobody waits: acknowledgements are collected at the next step. With ``every=1``, only
   every ``full_every``-th snapshot of a unit is its full state; the ones between are gradient records
   (the step's gradients and hyperparameters, a third of the bytes), sent to the same pools, which redo
   their steps on the full snapshot they follow.
3. When every unit's snapshot of step ``s`` is stored on all its replicas, the journal drops the calls
   before ``s`` and the pools drop what restoring ``s`` no longer needs (for a record, the steps before
   its full snapshot).
4. When a unit fails (its actor or node died, or a call missed its deadline), the runtime hands the
   fault here: a replacement starts (on a spare bundle, its own bundle, or another live node), restores
   the newest stored snapshot (a full one, then the records after it in order), receives the journaled
   calls since then in their original order, and the runtime's wait goes on with the replacement's
   results. Every call is deterministic, so the state is bit for bit what it would have been; each
   optimizer step is applied exactly once to the restored state.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from zetta_ray.checkpoint import TrickleCheckpoint
from zetta_ray.control.commits import Commits
from zetta_ray.control.durable import DurableCheckpointer
from zetta_ray.control.durable_writes import DurableWrites
from zetta_ray.control.liveness import Liveness
from zetta_ray.control.pools import PoolSet
from zetta_ray.control.ray_cluster import RayCluster
from zetta_ray.control.recovery import Replica
from zetta_ray.control.repair import RecoveryEvent, Repair
from zetta_ray.control.replay import ReplayLog
from zetta_ray.control.seams import Cluster, PendingCall, PoolActor, Runtime
from zetta_ray.control.slots import SlotLedger
from zetta_ray.control.snapshots import Snapshots
from zetta_ray.errors import RecoveryFailed, UnitFault

__all__ = ["FaultManager", "RecoveryEvent", "RecoveryFailed"]


class FaultManager:
    """Owns the MemoryPool actors, the replay journal and the recovery of one runtime's units.

    Args:
        config: what to snapshot, where and how often.
        unit_nodes: the node each unit runs on, by index (kept up to date as recoveries move units).
        spares: reserved places for replacements: (actor options of a bundle, its node).
        deadline_s: how long a snapshot put, a replay's fetch or a wait for stored snapshots may take.
        start_deadline_s: how long a replacement may take to start and restore (at least ``deadline_s``).
        cluster: the ``Cluster`` seam (``control/seams.py``); None: Ray (``RayCluster``).

    Starting it starts one MemoryPool per live node and waits until they answer.
    """

    def __init__(
        self,
        config: TrickleCheckpoint,
        *,
        unit_nodes: list[str],
        spares: list[tuple[dict[str, Any], str]] = (),
        deadline_s: float = 60.0,
        start_deadline_s: float = 180.0,
        cluster: Cluster | None = None,
    ):
        cluster = RayCluster() if cluster is None else cluster
        self.config = config
        self.cluster = cluster
        self.log = ReplayLog()
        self.unit_nodes = list(unit_nodes)
        self.deadline_s = deadline_s
        self.start_deadline_s = max(start_deadline_s, deadline_s)  # a replacement starts, then restores
        self.durable = (
            DurableCheckpointer(config, deadline_s=deadline_s) if config.durable_uri is not None else None
        )
        self._liveness = Liveness(cluster)
        self._pools = PoolSet(config, cluster)
        self._slots = SlotLedger(config, cluster)
        self._commits = Commits(
            config,
            deadline_s=deadline_s,
            cluster=cluster,
            pools=self._pools,
            slots=self._slots,
            liveness=self._liveness,
            log=self.log,
            durable=self.durable,
        )
        self._snapshots = Snapshots(
            config,
            deadline_s=deadline_s,
            pools=self._pools,
            slots=self._slots,
            commits=self._commits,
            unit_nodes=self.unit_nodes,
        )
        self._repair = Repair(
            deadline_s=deadline_s,
            start_deadline_s=self.start_deadline_s,
            cluster=cluster,
            pools=self._pools,
            slots=self._slots,
            liveness=self._liveness,
            commits=self._commits,
            snapshots=self._snapshots,
            log=self.log,
            unit_nodes=self.unit_nodes,
            spares=list(spares),
        )
        self._durable = DurableWrites(
            self.durable, deadline_s=deadline_s, commits=self._commits, snapshots=self._snapshots
        )
        for node in sorted(self._liveness.live_nodes()):
            self._pools.start(node)
        try:  # pools start while the units do; a unit lost before its first snapshot is unrecoverable
            self._pools.wait_started(timeout_s=max(deadline_s, 120.0))
        except cluster.failure as e:
            self.close()
            raise RecoveryFailed(f"the MemoryPool actors did not start: {e}") from e

    def attach(self, runtime: Runtime) -> None:
        """Become ``runtime``'s journal keeper and supervisor (told of steps, asked to recover)."""
        runtime.journal = self.log
        runtime.supervisor = self
        self._slots.node = runtime.node

    # -- what the parts hold, for reports, chaos and tests ------------------------------------------------

    @property
    def events(self) -> list[RecoveryEvent]:
        """Every recovery so far, oldest first."""
        return self._repair.events

    @property
    def pools(self) -> dict[str, PoolActor]:
        """Every MemoryPool started: name -> handle (dead ones included; see ``dead_pools``)."""
        return self._pools.handles

    @property
    def pool_nodes(self) -> dict[str, str]:
        """Every MemoryPool started: name -> its node."""
        return self._pools.nodes

    @property
    def dead_pools(self) -> set[str]:
        """The MemoryPools known dead (their replicas are gone)."""
        return self._pools.dead

    @property
    def dead_nodes(self) -> set[str]:
        """Nodes found dead (their raylet refused) before the cluster said so."""
        return self._liveness.dead_nodes

    @property
    def spares(self) -> list[tuple[dict[str, Any], str]]:
        """The reserved places for replacements not used yet."""
        return self._repair.spares

    @property
    def acked(self) -> dict[int, list[Replica]]:
        """Unit -> its snapshot replicas stored (acknowledged puts), as ``Replica``."""
        return self._commits.acked

    @property
    def full_pools(self) -> set[str]:
        """The pools that refused a full snapshot since the last commit (tried last)."""
        return self._commits.full_pools

    @property
    def committed_step(self) -> int:
        """The newest step whose snapshots are stored on all their replicas (-1: none yet)."""
        return self._commits.committed_step

    @property
    def stage_prefix(self) -> str:
        """The name prefix of this controller's shared-memory snapshot slots in ``/dev/shm``."""
        return self._slots.prefix

    @property
    def slots_in_use(self) -> int:
        """How many shared-memory snapshot slots hold a snapshot a pool has not dropped yet."""
        return len(self._slots.busy)

    def replica_targets(self, u: int) -> tuple[tuple[str, str], ...]:
        """The (pool, node) pairs unit ``u``'s next snapshot goes to."""
        return self._snapshots.replica_targets(u)

    # -- trickle checkpointing ----------------------------------------------------------------------------

    def after_step(self, runtime: Runtime) -> None:
        """Collect acknowledgements, commit what is stored, and snapshot if this step is due."""
        self._commits.collect()
        self._commits.check_room(runtime.step)
        if runtime.step % self.config.every == 0:
            self.snapshot(runtime)

    def snapshot(
        self, runtime: Runtime, wait: bool = False, units: list[int] | None = None, full: bool = False
    ) -> None:
        """Snapshot every unit (or those in ``units``) as of ``runtime.step`` onto R pools; ``wait``:
        until stored (the step-0 snapshot). See ``snapshots.Snapshots.take``."""
        self._snapshots.take(runtime, wait=wait, units=units, full=full)

    # -- recovery -----------------------------------------------------------------------------------------

    def recover(self, runtime: Runtime, error: UnitFault, calls: Sequence[PendingCall]) -> None:
        """Replace the failed unit of ``error`` (and its node's other units, if the node died), and
        re-send its calls in ``calls``; raise ``RecoveryFailed`` if impossible. See ``repair.Repair``."""
        self._repair.recover(runtime, error, calls)

    def lost_units(self, units: list[int]) -> list[int]:
        """Those of ``units`` whose node is dead, asking each node's raylet (``liveness.Liveness``)."""
        return self._liveness.lost_units(units, self.unit_nodes)

    # -- durable checkpoints ------------------------------------------------------------------------------

    def stage_durable(self, runtime: Runtime, dense: Any) -> None:
        """Write a durable checkpoint of the current step with ``dense`` (the controller's part) once the
        units' snapshots of this step are stored (snapshotting now if this step has none)."""
        self._durable.stage(runtime, dense)

    def finish_durable(self) -> None:
        """Wait until every staged durable checkpoint is written; raise if one could not be."""
        self._durable.finish()

    def restarted_at(self, runtime: Runtime) -> None:
        """The units were restored to ``runtime.step`` from a durable checkpoint: snapshot that state
        and count the durable schedule from there."""
        self._durable.restarted_at(runtime)

    def close(self) -> None:
        """Finish the durable checkpoints, kill the pools, remove the slots' names."""
        try:
            self._durable.close()
        finally:
            self._pools.kill_all()
            self._slots.close()
