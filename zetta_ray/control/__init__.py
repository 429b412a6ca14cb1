"""Control plane: fault records, recovery policies and the replay log (pure; no Ray calls).

The controller (``runtime/``, ``api/``) detects faults, asks these policies what to do, and carries the
decisions out; see docs/recovery.md for the protocol.

- ``Fault``, ``fault_from_error``, ``faults_from_node_death``: what failed, where, when.
- ``decide_recovery`` -> ``RecoveryDecision``: where a replacement goes and which replica it restores.
- ``decide_replica_nodes``: which live MemoryPools hold a unit's next snapshot.
- ``ReplayLog``: the calls to send again to a replacement, and when they may be dropped.
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
