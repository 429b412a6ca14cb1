"""``TrickleCheckpoint``: how often state is snapshotted, how many replicas it gets, when it goes to disk.

Two tiers, because they fail differently and cost differently:

- **Trickle snapshots** (every ``every`` steps): each unit's state is copied into the Ray object store
  and held by MemoryPool actors on ``replicas`` other nodes. Cheap (a memory copy and a network send,
  off the training thread) and fast to restore, but gone if all replica nodes die, or the whole job.
- **Durable checkpoints** (every ``durable_every`` steps and/or ``durable_interval_s`` seconds): one
  consistent checkpoint of every part, written through ``pyarrow.fs`` to ``durable_uri``. Survives the
  job; costs storage bandwidth, so it runs less often. ``keep_last`` bounds the space it takes.

With ``every=1`` a failed unit loses no work at all: its snapshot from the last completed step plus the
logged inputs of the unfinished step are enough to redo exactly that step. A larger ``every`` trades
snapshot bandwidth for replaying up to ``every`` steps after a fault.

With ``every=1`` a snapshot need not hold the whole state: a unit's optimizer step is a deterministic
function of its state before, its gradients and its hyperparameters, so between two full snapshots
(every ``full_every`` steps) each step sends only a gradient record, a third of the bytes for AdamW. A
restore loads the last full snapshot and redoes the recorded optimizer steps (no forward or backward is
recomputed), bitwise the same. ``full_every=1`` sends the full state every step.
"""

from __future__ import annotations

from dataclasses import dataclass
from os import PathLike, fspath
from typing import Any

from zetta_ray.errors import ConfigError

__all__ = ["TrickleCheckpoint"]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check(ok: bool, field: str, value: Any, fix: str) -> None:
    if not ok:
        raise ConfigError(f"TrickleCheckpoint.{field}={value!r} is invalid: {fix}")


@dataclass(kw_only=True, slots=True)
class TrickleCheckpoint:
    """Checkpoint settings for ``zr.parallelize(..., checkpoint=zr.TrickleCheckpoint(...))``.

    Attributes:
        every: snapshot every k-th step into MemoryPool replicas (1 = after every step).
        full_every: with ``every=1``, a unit's full state every this many steps and its gradient
            record (its gradients and the step's hyperparameters) at the steps between; 1 = the full
            state every step. Pools then hold up to one full snapshot and ``full_every - 1`` records
            per unit (plus the next one in flight), and a restore redoes up to ``full_every - 1``
            optimizer steps. Ignored when ``every`` > 1 (every snapshot is full).
        replicas: R, how many MemoryPool actors on distinct nodes (never the unit's own node when another
            exists) hold each snapshot. R nodes can fail at once before a unit's state is lost.
        durable_uri: where durable checkpoints go: a local path, or ``s3://``, ``gs://``, ``hdfs://``
            (anything ``pyarrow.fs.FileSystem.from_uri`` opens). ``None`` turns durable checkpoints off
            (in-memory replicas only), unless the launcher supplies a directory.
        durable_every: N, write a durable checkpoint at every step divisible by N (a multiple of
            ``every``, so each durable step has a snapshot). ``None``: time-based only.
        durable_interval_s: T, also write one when T seconds have passed since the last one. ``None``:
            step-based only. At least one of ``durable_every`` and ``durable_interval_s`` must be set.
        keep_last: K, how many complete durable checkpoints to keep. Keep at least 2 so that a corrupted
            newest checkpoint still leaves a good one to fall back to.
        pool_bytes: the most bytes of snapshots each MemoryPool (one per node) holds. A pool holds, per
            unit it serves, a full snapshot (parameters and optimizer state: 3x the parameters with
            AdamW), up to ``full_every - 1`` gradient records (1x each) and the next snapshot in flight.
            Too small, and records give way to full snapshots; too small for the step-0 snapshots,
            ``zr.parallelize`` fails at once; full snapshots refused with nothing committed for
            ``2 * full_every * every`` steps stop training (``RecoveryFailed``, with the sizes).
    """

    every: int = 1
    full_every: int = 8
    replicas: int = 2
    durable_uri: str | None = None
    durable_every: int | None = 100
    durable_interval_s: float | None = None
    keep_last: int = 3
    pool_bytes: int = 2 << 30

    def __post_init__(self) -> None:
        _check(_is_int(self.every) and self.every >= 1, "every", self.every, "must be an integer >= 1")
        _check(
            _is_int(self.full_every) and self.full_every >= 1,
            "full_every",
            self.full_every,
            "must be an integer >= 1 (1 = the full state in every snapshot, no gradient records)",
        )
        _check(
            _is_int(self.replicas) and self.replicas >= 1,
            "replicas",
            self.replicas,
            "must be an integer >= 1 (2 survives one node failure while a replacement is restored)",
        )
        if isinstance(self.durable_uri, PathLike):
            self.durable_uri = fspath(self.durable_uri)
        _check(
            self.durable_uri is None
            or (isinstance(self.durable_uri, str) and self.durable_uri.strip() != ""),
            "durable_uri",
            self.durable_uri,
            "must be None (no durable checkpoints) or a non-empty path or URI such as 's3://bucket/run'",
        )
        _check(
            self.durable_every is None or (_is_int(self.durable_every) and self.durable_every >= 1),
            "durable_every",
            self.durable_every,
            "must be None or an integer >= 1",
        )
        _check(
            self.durable_every is None or self.durable_every % self.every == 0,
            "durable_every",
            self.durable_every,
            f"must be a multiple of every ({self.every}) so that every durable step has a snapshot; "
            f"try durable_every={-(-(self.durable_every or 1) // self.every) * self.every}",
        )
        interval = self.durable_interval_s
        _check(
            interval is None
            or (isinstance(interval, (int, float)) and not isinstance(interval, bool) and interval > 0),
            "durable_interval_s",
            interval,
            "must be None or a number of seconds > 0",
        )
        _check(
            self.durable_every is not None or interval is not None,
            "durable_every",
            self.durable_every,
            "durable_every and durable_interval_s are both None; set at least one of them",
        )
        _check(
            _is_int(self.keep_last) and self.keep_last >= 1,
            "keep_last",
            self.keep_last,
            "must be an integer >= 1 (>= 2 recommended, so a corrupted newest checkpoint has a fallback)",
        )
        _check(
            _is_int(self.pool_bytes) and self.pool_bytes > 0,
            "pool_bytes",
            self.pool_bytes,
            "must be a byte count > 0 (the default is 2 GiB, 2 << 30)",
        )

    @property
    def durable(self) -> bool:
        """Whether durable checkpoints are written at all."""
        return self.durable_uri is not None
