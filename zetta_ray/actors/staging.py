"""Snapshots to a MemoryPool on the unit's own node through shared memory: one warm copy, no object store.

A snapshot sent through Ray's object store costs the unit a put: an IPC round trip with the store, a copy
into store pages, and page faults wherever the store places the object in pages this process has not
touched yet (the store's arena is large, and a run of a few hundred steps keeps meeting such pages:
8,452 faults and ~22 ms of CPU for a cold 33 MB put against ~3 ms warm; BENCHMARKS.md, issue 4). On a
machine whose cores the training step already fills, that is step time.

When the MemoryPool that holds a unit's snapshots runs on the unit's node (one machine, or no other node
left for the replicas), the unit instead copies each snapshot into a *slot*: a segment in ``/dev/shm``
that the pool maps and keeps, so the pool holds the snapshot without a copy of its own. A unit has a few
slots per kind (full snapshots, gradient records) and the fault manager hands each snapshot a slot that
no held snapshot uses any more (``control.manager``: a slot is reused only after the pool has confirmed
dropping what it held there), so the unit writes into pages it has written before: one warm memcpy.

- ``stage`` (unit side) copies every array of at least ``MIN_STAGED_BYTES`` into the slot and returns a
  ``StagedSnapshot``: the snapshot's trees with those arrays replaced by ``StagedArray`` (offset, shape,
  dtype), a few KB through Ray. A slot too small for the snapshot (the first full snapshot has no
  optimizer moments yet) is replaced by a bigger one under the next generation of its name.
- ``unstage`` (pool side) rebuilds the ``Snapshot`` with numpy views of the pool's mapping of the slot.

The segment names start with the controller's ``zetta_ray-<pid>-<token>`` prefix (``actors.shm``), so the
segments of a controller that died are removed with its other segments. The fault manager unlinks a
unit's slot names when the unit is replaced and when it closes; the pool's mapping keeps a slot's memory
alive while the pool holds snapshots in it.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from zetta_ray.actors.shm import SHM_DIR
from zetta_ray.checkpoint import GRADIENT_RECORD, Snapshot

__all__ = [
    "MIN_STAGED_BYTES",
    "SlotWriter",
    "StagedArray",
    "StagedSnapshot",
    "open_slot",
    "slot_name",
    "staged_bytes",
    "unlink_slots",
    "unstage",
]

MIN_STAGED_BYTES = 64 << 10  # smaller arrays (RNG state, AdamW's step counters) travel inline
_ALIGN = 64
_FIELDS = tuple(f.name for f in fields(Snapshot) if f.name != "step")


@dataclass(frozen=True, slots=True)
class StagedArray:
    """An array at ``offset`` in a ``StagedSnapshot``'s segment."""

    offset: int
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


@dataclass(frozen=True, slots=True)
class StagedSnapshot:
    """A ``Snapshot`` whose big arrays sit in the shared segment ``segment`` (see the module docstring).

    Attributes:
        segment: the slot's name in ``/dev/shm``.
        step: the snapshot's step.
        trees: the snapshot's fields but ``step``, by name, with ``StagedArray`` in place of big arrays.
    """

    segment: str
    step: int
    trees: dict[str, Any] = field(default_factory=dict)

    @property
    def is_gradient_record(self) -> bool:
        return self.trees.get("extra", {}).get("kind") == GRADIENT_RECORD


def slot_name(prefix: str, unit: int, incarnation: int, kind: str, index: int, generation: int = 0) -> str:
    """The segment name of a unit's slot: ``<prefix>-<unit>.<incarnation>.<kind>.<index>.<generation>``.
    Everything before the last dot names the slot; the generation changes when the slot grows."""
    return f"{prefix}-{unit}.{incarnation}.{kind}.{index}.{generation}"


def _slot_key(name: str) -> str:
    return name.rsplit(".", 1)[0]


class SlotWriter:
    """A unit's slots: segments it created and keeps mapped, by slot (name without its generation)."""

    def __init__(self) -> None:
        self._slots: dict[str, tuple[str, mmap.mmap]] = {}

    def stage(self, snapshot: Snapshot, slot: str) -> StagedSnapshot:
        """Copy ``snapshot``'s big arrays into slot ``slot`` (a ``slot_name``; created, or grown under
        its next generation, as needed) and describe the result."""
        big: list[np.ndarray] = []
        trees = {name: _replace(getattr(snapshot, name), big) for name in _FIELDS}
        offsets, top = [], 0
        for a in big:
            offsets.append(top)
            top += -(-a.nbytes // _ALIGN) * _ALIGN
        name, mm = self._mapping(slot, max(top, _ALIGN))
        out = np.frombuffer(mm, dtype=np.uint8)
        for a, off in zip(big, offsets, strict=True):
            out[off : off + a.nbytes] = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
        staged = iter(
            StagedArray(off, tuple(a.shape), a.dtype.str) for a, off in zip(big, offsets, strict=True)
        )
        return StagedSnapshot(name, snapshot.step, {k: _fill(v, staged) for k, v in trees.items()})

    def reserve(self, slots: list[tuple[str, int]]) -> None:
        """Create the slots ``(name, bytes)`` now, their pages mapped (warm), so that the first snapshots
        written into them cost what later ones do."""
        for name, size in slots:  # (0 bytes: every array travels inline; the slot stays nearly empty)
            self._mapping(name, max(size, _ALIGN), populate=True)

    def forget(self) -> None:
        """Unmap every slot (the names stay until the fault manager unlinks them)."""
        for _, mm in self._slots.values():
            with contextlib.suppress(BufferError):
                mm.close()
        self._slots.clear()

    def _mapping(self, slot: str, size: int, populate: bool = False) -> tuple[str, mmap.mmap]:
        key = _slot_key(slot)
        held = self._slots.get(key)
        if held is not None and len(held[1]) >= size:
            return held
        name = slot
        if held is not None:  # too small: the pool has mapped it at its size; grow under a new name
            old, mm = held
            with contextlib.suppress(BufferError):
                mm.close()
            _unlink(old)  # a slot is handed out only once the pool dropped what it held there
            name = f"{key}.{int(old.rsplit('.', 1)[1]) + 1}"
        path = os.path.join(SHM_DIR, name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            # reserve the pages now: a truncated tmpfs file that runs out of space raises SIGBUS on touch
            os.posix_fallocate(fd, 0, size)
            flags = mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if populate else 0)
            mm = mmap.mmap(fd, size, flags=flags)
        except OSError:
            os.close(fd)
            _unlink(name)
            raise
        os.close(fd)
        self._slots[key] = (name, mm)
        return name, mm


def unstage(staged: StagedSnapshot, mapping: mmap.mmap) -> Snapshot:
    """The ``Snapshot`` that ``staged`` describes, its big arrays views of ``mapping`` (the segment)."""
    buf = np.frombuffer(mapping, dtype=np.uint8)

    def view(s: StagedArray) -> np.ndarray:
        return buf[s.offset : s.offset + s.nbytes].view(np.dtype(s.dtype)).reshape(s.shape)

    return Snapshot(step=staged.step, **{k: _map(v, view) for k, v in staged.trees.items()})


def open_slot(name: str) -> mmap.mmap:
    """A mapping of slot segment ``name`` (the pool's side)."""
    fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR)
    try:
        return mmap.mmap(fd, 0)
    finally:
        os.close(fd)


def unlink_slots(prefix: str) -> int:
    """Remove every slot name starting with ``prefix`` (on this node); return how many."""
    removed = 0
    with contextlib.suppress(OSError):
        for name in os.listdir(SHM_DIR):
            if name.startswith(prefix):
                removed += _unlink(name)
    return removed


def staged_bytes(arrays: list[np.ndarray]) -> int:
    """The bytes a slot needs for ``arrays`` (those ``stage`` would put in it, aligned)."""
    return sum(-(-a.nbytes // _ALIGN) * _ALIGN for a in arrays if a.nbytes >= MIN_STAGED_BYTES)


def _unlink(name: str) -> int:
    try:
        os.unlink(os.path.join(SHM_DIR, name))
    except FileNotFoundError:
        return 0
    return 1


def _replace(node: Any, big: list[np.ndarray]) -> Any:
    """``node`` with each array of at least MIN_STAGED_BYTES taken out (into ``big``) and the smaller
    ones copied (the snapshot may hold views of the unit's live state)."""

    def leaf(a: Any) -> Any:
        if not isinstance(a, np.ndarray):
            return a
        if a.nbytes < MIN_STAGED_BYTES:
            return a.copy()
        big.append(a)
        return _BIG

    return _rebuild(node, leaf)


class _Big:
    """Where a big array was taken out (filled in with its ``StagedArray`` by ``_fill``)."""


_BIG = _Big()


def _fill(node: Any, staged: Any) -> Any:
    return _rebuild(node, lambda a: next(staged) if a is _BIG else a)


def _map(node: Any, view: Any) -> Any:
    return _rebuild(node, lambda a: view(a) if isinstance(a, StagedArray) else a)


def _rebuild(node: Any, leaf: Any) -> Any:
    """``node``'s dicts, lists and tuples rebuilt, in order, with ``leaf`` applied to everything else."""
    if isinstance(node, dict):
        return {k: _rebuild(v, leaf) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return type(node)(_rebuild(v, leaf) for v in node)
    return leaf(node)
