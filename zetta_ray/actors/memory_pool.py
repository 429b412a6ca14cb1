"""MemoryPool: the actor that holds snapshot replicas, so a snapshot outlives the unit that made it.

In Ray an object belongs to the process that created it; when that process dies, the object is lost,
even if copies of its bytes sit in other nodes' object stores. A snapshot that only its unit owns would
die with the unit, which is exactly when it is needed. So each unit's snapshot
(``actors.snapshot``) is handed to MemoryPool actors on R other nodes, and each pool holds it:

- A ``checkpoint.Snapshot`` (what the fault manager sends after every step) arrives as numpy arrays
  that Ray maps from the object store of the pool's node, without a copy (Ray moved the bytes there if
  they were made on another node). The pool keeps those arrays, and Ray keeps object memory that a
  live process still reads, even after the object's owner or the unit that made it died; so the copy
  lives as long as the pool holds it and costs the training loop nothing beyond the unit's one write
  into the object store.
- Encoded snapshot ``bytes`` (``checkpoint.encode_snapshot``) arrive as the pool's own copy.
- A ``StagedSnapshot`` (``actors.staging``), from a unit on the pool's own node, names a shared-memory
  slot the unit copied its snapshot into; the pool maps the slot and holds views of it, again without a
  copy, for as long as it holds the snapshot.

A pool that dies loses its copies (the other replicas remain).

Blobs are keyed by ``(unit, step)``: the owner part (a unit index, or a name such as ``"controller"``)
and the number of optimizer steps completed when the snapshot was taken. ``put`` reads the snapshot's
step (for bytes, from the manifest alone: ``checkpoint.read_manifest``) and refuses one whose step is
not the key's. Byte accounting counts the arrays (or the bytes) held.

Gradient records (``Snapshot.is_gradient_record``: a unit's gradients of one step, a third of a whole
snapshot) form chains: a full snapshot of step ``b`` and the records of ``b+1 .. s`` together restore
step ``s``. A record never replaces a full snapshot of the same step (the full state serves better).

The byte limit protects the node: a put that would pass it first evicts that owner's steps that the
new blob makes useless for recovery (for a full snapshot, every older step; for a record, the steps
before the full snapshot its chain starts from) and, if the blob still does not fit, raises
``PoolFullError`` without evicting anything. Steps of other owners are never evicted: they may be the
last copy someone needs.

``MemoryPool`` is a plain class (testable in-process); ``MemoryPoolActor`` is the Ray actor. It asks
for no CPU (it is idle between puts); place it with a scheduling strategy (node affinity or a
placement-group bundle) on the node that should hold the replicas.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import ray

from zetta_ray.actors.staging import StagedSnapshot, open_slot, unstage
from zetta_ray.checkpoint import Snapshot, read_manifest
from zetta_ray.errors import ConfigError, PoolFullError, SnapshotNotHeldError
from zetta_ray.quantities import mib

__all__ = ["MemoryPool", "MemoryPoolActor", "PoolFullError", "SnapshotNotHeldError"]

logger = logging.getLogger(__name__)

Owner = int | str  # a unit index, or a part name such as "controller"
Held = Snapshot | bytes


def _is_full(blob: Held) -> bool:
    """Whether ``blob`` restores on its own: a snapshot's bytes, or a ``Snapshot`` that is no gradient
    record."""
    return isinstance(blob, bytes) or not blob.is_gradient_record


class MemoryPool:
    """A keyed store of snapshot blobs with a byte limit. See the module docstring.

    Args:
        limit_bytes: the most bytes of blobs this pool holds at once.
        name: how errors and ``stats()`` name this pool (``"pool-1"``).
    """

    def __init__(self, limit_bytes: int, name: str = "pool"):
        if not isinstance(limit_bytes, int) or isinstance(limit_bytes, bool) or limit_bytes <= 0:
            raise ConfigError(f"MemoryPool(limit_bytes={limit_bytes!r}) is invalid: give a byte count > 0")
        self.limit_bytes = limit_bytes
        self.name = name
        self._blobs: dict[tuple[Owner, int], Held] = {}
        self._sizes: dict[tuple[Owner, int], int] = {}
        self._used = 0
        self._slots: dict[str, tuple[Any, int]] = {}  # slot segment -> (this pool's mapping, blobs in it)
        self._slot_of: dict[tuple[Owner, int], str] = {}

    # -- store ----------------------------------------------------------------------------------------

    def put(
        self, unit: Owner, step: int, blob: Snapshot | StagedSnapshot | bytes | bytearray | memoryview
    ) -> int:
        """Hold ``blob``, the snapshot of ``unit`` after ``step`` steps; return its byte count.

        A blob already held under the same key is replaced, except a full snapshot by a gradient record
        (then the held size is returned). If the pool would pass its limit, ``unit``'s steps that the
        blob makes useless are evicted first (see the module docstring); ``PoolFullError`` if it still
        would not fit (then nothing is evicted).
        """
        slot = blob.segment if isinstance(blob, StagedSnapshot) else None
        if slot is not None:
            mapping = self._slots[slot][0] if slot in self._slots else open_slot(slot)
            blob = unstage(blob, mapping)
        if isinstance(blob, Snapshot):
            data: Held = blob
            manifest_step, size = blob.step, blob.nbytes
        else:
            # A ``bytes`` argument of a Ray call is already this process's own copy; anything else (a
            # view into memory someone else owns) is copied now.
            data = blob if type(blob) is bytes else bytes(blob)
            manifest_step = read_manifest(data, source=f"{self.name}: unit {unit} step {step}").step
            size = len(data)
        if manifest_step != step:
            raise ValueError(
                f"{self.name}: put(unit={unit!r}, step={step}) got the snapshot of step {manifest_step}; "
                "key a snapshot by the step it was taken at (Snapshot.step)"
            )
        key = (unit, step)
        full = _is_full(data)
        held = self._blobs.get(key)
        if not full and held is not None and _is_full(held):
            return self._sizes[key]  # the full snapshot of this step is held already: it serves better
        older = sorted(s for u, s in self._blobs if u == unit and s < self._base(unit, step, full))
        reclaimable = sum(self._sizes[(unit, s)] for s in older)
        free = self.limit_bytes - self._used + self._sizes.get(key, 0)
        if size > free + reclaimable:
            raise PoolFullError(
                f"{self.name} cannot hold the snapshot of unit {unit!r} at step {step}: it needs "
                f"{mib(size)} ({size} bytes) but only {mib(free + reclaimable)} ({free + reclaimable} "
                f"bytes) would be free of its {mib(self.limit_bytes)} limit even after evicting unit "
                f"{unit!r}'s steps {older}, which it makes useless (the rest: other units' snapshots). "
                "Raise the limit (TrickleCheckpoint(pool_bytes=...) for the pools zr.parallelize "
                "starts), spread the units over more pools, or drop_before() steps no recovery needs.",
                pool=self.name,
                unit=unit,
                step=step,
                needed=size,
                free=free + reclaimable,
                limit=self.limit_bytes,
            )
        for s in older:
            if size <= free:
                break
            free += self._sizes[(unit, s)]
            self._forget((unit, s))
            logger.info("%s: evicted unit %r step %d to make room for step %d", self.name, unit, s, step)
        self._forget(key)
        self._blobs[key] = data
        self._sizes[key] = size
        self._used += size
        if slot is not None:
            self._slots[slot] = (mapping, self._slots.get(slot, (None, 0))[1] + 1)
            self._slot_of[key] = slot
        return size

    def _base(self, unit: Owner, step: int, full: bool) -> int:
        """The oldest step of ``unit`` still needed once its blob of ``step`` is held: ``step`` itself
        for a full snapshot; for a gradient record, the newest full snapshot before it (the record
        redoes its step on top of that snapshot and the records between), or ``step`` if none."""
        if full:
            return step
        bases = [s for (u, s), blob in self._blobs.items() if u == unit and s < step and _is_full(blob)]
        return max(bases, default=step)

    def get(self, unit: Owner, step: int | None = None) -> Held:
        """The blob of ``unit`` at ``step``, or its newest when ``step`` is None."""
        held = self.steps(unit)
        if step is None and held:
            step = held[-1]
        if step is None or (unit, step) not in self._blobs:
            what = f"step {step}" if step is not None else "any step"
            raise SnapshotNotHeldError(
                f"{self.name} holds no snapshot of unit {unit!r} at {what}; it holds steps {held} of that "
                f"unit and units {self.units()} in all. Restore from another replica or an older step.",
                pool=self.name,
                unit=unit,
                step=step,
                held=held,
            )
        return self._blobs[(unit, step)]

    def steps(self, unit: Owner) -> list[int]:
        """The steps held for ``unit``, oldest first."""
        return sorted(s for u, s in self._blobs if u == unit)

    def units(self) -> list[Owner]:
        """The owners with at least one snapshot here."""
        return sorted({u for u, _ in self._blobs}, key=lambda u: (type(u).__name__, u))

    def drop_before(self, unit: Owner, step: int) -> int:
        """Forget ``unit``'s snapshots older than ``step``; return the bytes freed."""
        freed = 0
        for s in self.steps(unit):
            if s < step:
                freed += self._sizes[(unit, s)]
                self._forget((unit, s))
        return freed

    # -- control ----------------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Bytes used and the limit, the keys held, and where this pool runs (node id, pid)."""
        return {
            "name": self.name,
            "bytes_used": self._used,
            "limit_bytes": self.limit_bytes,
            "keys": sorted(self._blobs, key=lambda k: (type(k[0]).__name__, k)),
            "slots": len(self._slots),
            "node_id": ray.get_runtime_context().get_node_id() if ray.is_initialized() else None,
            "pid": os.getpid(),
        }

    def ping(self) -> str:
        return self.name

    def _forget(self, key: tuple[Owner, int]) -> None:
        if self._blobs.pop(key, None) is not None:
            self._used -= self._sizes.pop(key)
        slot = self._slot_of.pop(key, None)
        if slot is not None:
            mapping, held = self._slots[slot]
            if held > 1:
                self._slots[slot] = (mapping, held - 1)
            else:  # unmapped once the last view of it goes (a get's reply is a copy made already)
                del self._slots[slot]


# Out of order: a put waits for its blob before it runs, and a blob made on a node that just died
# resolves only when the cluster declares that node dead (~15 s with Ray's default health checks). In
# order, every later call (the ``get`` that restores a replacement, the ``ping`` that checks this pool)
# would wait behind it. Nothing here needs submission order: the controller reads a replica only after
# its put answered, and it drops only steps older than ones already stored.
MemoryPoolActor = ray.remote(
    num_cpus=0, max_restarts=0, max_task_retries=0, allow_out_of_order_execution=True
)(MemoryPool)
