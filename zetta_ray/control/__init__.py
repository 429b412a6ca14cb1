"""Control plane: what failed, what to do about it, and the fault manager that does it.

The pure policies (no Ray, no I/O; each unit-tested on its own):

- ``Fault``, ``fault_from_error``, ``faults_from_node_death`` (``faults.py``): what failed, where, when.
- ``decide_recovery`` -> ``RecoveryDecision`` (``recovery.py``): where a replacement goes and which
  replica it restores.
- ``decide_replica_nodes`` (``replicas.py``): which live MemoryPools hold a unit's next snapshot.
- ``ReplayLog`` (``replay.py``): the calls to send again to a replacement, and when they may be dropped.
- ``SnapshotRound``, ``plan_commit`` (``rounds.py``): which snapshot round to commit.

The fault manager (``manager.FaultManager``) coordinates parts with one job each: ``pools.py`` (MemoryPool
lifecycle), ``slots.py`` (shared-memory slot ledger), ``liveness.py`` (node liveness, a raylet probe),
``snapshots.py`` (snapshot rounds), ``commits.py`` (acknowledgements and commits), ``repair.py``
(recovery carried out), ``durable_writes.py`` and ``durable.py`` (durable checkpoints, written through
pyarrow.fs on a flusher thread). These reach the cluster and the training side only through the
``typing.Protocol`` seams of ``seams.py``, so the unit tests drive them with fakes.

Data-parallel dense replicas need none of that: ``sibling_repair.SiblingRepair`` rebuilds a dead replica
from a live sibling (its state and the journal of the replica group, ``runtime/replicas.py``), no
snapshot read; it reaches Ray only through the group. A pipeline stage has no sibling:
``stage_repair.StageRepair`` takes the whole pipeline back to the stages' last snapshot (held by
MemoryPool actors, ``runtime/stages.py``) and replays the pipeline's journal, also through its group.

Three files of this package import Ray: ``ray_cluster.py``, the real ``Cluster`` seam (the node list,
MemoryPool actors, kill, get and wait), which ``manager.py`` builds unless given another;
``durable.py``, whose flusher thread reads the stored snapshots it writes (``ray.get``); and
``faults.py``, which only reads Ray's exception classes to tell an actor's death from its error. None
of them connects to or starts a cluster on import.
The controller (``runtime/``, ``api/``) detects faults and hands them to the manager; the protocol is in
docs/recovery.md.
"""

from __future__ import annotations

from zetta_ray.control.faults import (
    PHASES,
    Fault,
    FaultKind,
    PoolId,
    fault_from_error,
    faults_from_node_death,
)
from zetta_ray.control.recovery import RecoveryAction, RecoveryDecision, Replica, Spare, decide_recovery
from zetta_ray.control.replay import LoggedCall, ReplayLog, ReplayUnavailableError
from zetta_ray.control.replicas import decide_replica_nodes

__all__ = [
    "PHASES",
    "Fault",
    "FaultKind",
    "LoggedCall",
    "PoolId",
    "RecoveryAction",
    "RecoveryDecision",
    "Replica",
    "ReplayLog",
    "ReplayUnavailableError",
    "Spare",
    "decide_recovery",
    "decide_replica_nodes",
    "fault_from_error",
    "faults_from_node_death",
]
