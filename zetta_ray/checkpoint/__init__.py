"""Checkpoints: the snapshot format, the durable store, trickle scheduling and replica placement.

Pure Python over numpy, msgpack, safetensors and ``pyarrow.fs``; no Ray, no torch, no pickle. The
MemoryPool actor, the trickle scheduler and recovery build on these pieces (see docs/checkpoint.md):

- ``Snapshot`` / ``encode_snapshot`` / ``decode_snapshot``: one part's state <-> verified bytes.
- ``DurableStore``: one consistent, atomically committed checkpoint per step; ``latest()`` falls back
  past corrupted ones; keeps the last K.
- ``AsyncFlusher``: runs durable writes on one background thread with a bounded queue.
- ``TrickleCheckpoint`` / ``decide``: when to snapshot and when to write durably.
- ``choose_replica_nodes``: which nodes hold a unit's snapshot replicas.
"""

from __future__ import annotations

from zetta_ray.checkpoint.config import TrickleCheckpoint
from zetta_ray.checkpoint.flusher import AsyncFlusher
from zetta_ray.checkpoint.layout import MANIFEST, MARKER, CheckpointInfo, PartEntry, step_dir_name
from zetta_ray.checkpoint.policy import TrickleDecision, TrickleState, decide, should_snapshot
from zetta_ray.checkpoint.replicas import choose_replica_nodes
from zetta_ray.checkpoint.snapshot import (
    GRADIENT_RECORD,
    Snapshot,
    SnapshotManifest,
    TensorEntry,
    decode_snapshot,
    encode_snapshot,
    read_manifest,
)
from zetta_ray.checkpoint.store import DurableStore
from zetta_ray.errors import (
    CheckpointError,
    CorruptCheckpointError,
    FlushError,
    FlushTimeout,
    NoValidCheckpointError,
    ReplicaPlacementError,
    SnapshotFormatError,
)

__all__ = [
    "GRADIENT_RECORD",
    "MANIFEST",
    "MARKER",
    "AsyncFlusher",
    "CheckpointError",
    "CheckpointInfo",
    "CorruptCheckpointError",
    "DurableStore",
    "FlushError",
    "FlushTimeout",
    "NoValidCheckpointError",
    "PartEntry",
    "ReplicaPlacementError",
    "Snapshot",
    "SnapshotFormatError",
    "SnapshotManifest",
    "TensorEntry",
    "TrickleCheckpoint",
    "TrickleDecision",
    "TrickleState",
    "choose_replica_nodes",
    "decide",
    "decode_snapshot",
    "encode_snapshot",
    "read_manifest",
    "should_snapshot",
    "step_dir_name",
]
