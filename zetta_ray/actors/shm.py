"""Rows through shared memory between the controller and the units on its node.

Sent through Ray's object store, every call's rows cost the sender a put (an IPC round trip with the
store, then a copy into store pages the process has not touched before: page faults) and the receiver
the same again for its result: on a 2-core machine a call carrying 1 MB each way took 1.3 ms of the
caller's CPU and 2.3 ms of wall time, against 0.8 ms and 0.7 ms when the rows sit in a shared segment
that both processes have mapped already and the call carries only descriptors
(benchmarks/transport.py, BENCHMARKS.md).

The controller owns a ``SharedArena``: segments in ``/dev/shm``, carved into regions, each region one
``(rows, D)`` array (a layer's grouped rows, or the buffer its units write their outputs into). A
call names the rows it reads or writes with a ``SharedRows``: the segment's name, the array's place in
it, and the row ranges that belong to the call. The unit maps the segment once and then reads and
writes in place.

A region lives as long as a Python reference to one of its ``SharedRows`` or to a tensor over it
(``SharedRows.tensor``): the arguments of a call in flight, the replay journal's record of it, the
tensor autograd holds. That is the rule Ray applies to ObjectRefs, and it is what keeps a forward's
rows (which a unit keeps as an activation for backward, and which a replay may send again) alive
exactly as long as something may read them. When every region of a segment is gone, the segment is
reused from its start, so its pages stay mapped (warm) in every process that touched them.

Only units on the controller's node take this path, and only where ``/dev/shm`` exists (Linux); the
rest get arrays through the object store, as do calls replayed onto a replacement (``portable``), which
may run on another node. A segment that cannot be reserved (``/dev/shm`` full) sends the call through
the object store too. A controller that dies leaves its segments behind; the next arena on the
machine removes the segments of controllers that no longer run.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import re
import secrets
import threading
import time
from typing import Any

import numpy as np
import torch

__all__ = ["SharedArena", "SharedRows", "portable", "read_rows", "write_rows"]

logger = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
SEGMENT_BYTES = 64 << 20  # a segment holds several regions; bigger requests get a segment of their own
_ALIGN = 64
_NAME = re.compile(r"^zetta_ray-(\d+)-[0-9a-f]+-[0-9a-z.]+$")  # (snapshot slots: actors/staging.py)
_MAPS: dict[str, mmap.mmap] = {}  # segment name -> this process's mapping of it
_MAPS_LOCK = threading.Lock()


class SharedRows:
    """Rows of a ``shape`` array at ``offset`` in shared segment ``segment``: the concatenation of rows
    ``lo:hi`` for each of ``ranges``. ``output`` marks rows the receiving unit writes (its results).

    Pickles as the descriptor alone; the controller's copy also holds the region's lease, so the region
    lives while the descriptor does (see the module docstring).
    """

    __slots__ = ("segment", "offset", "shape", "dtype", "ranges", "output", "_lease")

    def __init__(
        self,
        segment: str,
        offset: int,
        shape: tuple[int, ...],
        dtype: str,
        ranges: tuple[tuple[int, int], ...],
        output: bool = False,
        lease: Any = None,
    ):
        self.segment, self.offset, self.shape, self.dtype = segment, offset, tuple(shape), dtype
        self.ranges, self.output, self._lease = tuple(ranges), output, lease

    def __reduce__(self) -> tuple[Any, ...]:
        return SharedRows, (self.segment, self.offset, self.shape, self.dtype, self.ranges, self.output)

    def __repr__(self) -> str:
        kind = "output" if self.output else "input"
        return f"SharedRows({self.segment}@{self.offset}, {self.shape}, rows {list(self.ranges)}, {kind})"

    def take(self, ranges: list[tuple[int, int]], output: bool = False) -> SharedRows:
        """The rows ``ranges`` of the same array (sharing its lease)."""
        return SharedRows(
            self.segment, self.offset, self.shape, self.dtype, tuple(ranges), output, self._lease
        )

    @property
    def rows(self) -> int:
        return sum(hi - lo for lo, hi in self.ranges)

    @property
    def nbytes(self) -> int:
        row = int(np.prod(self.shape[1:], dtype=np.int64)) * np.dtype(self.dtype).itemsize
        return self.rows * row

    def array(self) -> np.ndarray:
        """The whole array, mapped in place (writable)."""
        return np.ndarray(self.shape, self.dtype, buffer=_mapping(self.segment), offset=self.offset)

    def tensor(self) -> torch.Tensor:
        """The whole array as a tensor that keeps the region alive for as long as it (or a view of it)
        lives. Controller side only: it needs the lease."""
        if self._lease is None:
            raise RuntimeError(f"{self!r} carries no lease: only the arena's own descriptors make tensors")
        leased = self.array().view(_Leased)
        leased.lease = self._lease
        return torch.from_numpy(leased)


class _Leased(np.ndarray):
    """An ndarray that holds a region's lease (torch.from_numpy keeps the array object alive)."""


def read_rows(rows: SharedRows) -> np.ndarray:
    """The rows ``rows`` names: a view when they are one range, else a copy of their concatenation."""
    whole = rows.array()
    if len(rows.ranges) == 1:
        lo, hi = rows.ranges[0]
        return whole[lo:hi]
    return np.concatenate([whole[lo:hi] for lo, hi in rows.ranges])


def write_rows(rows: SharedRows, values: np.ndarray) -> None:
    """Write ``values`` (``rows.rows`` rows, in order) into the ranges ``rows`` names."""
    if values.shape[0] != rows.rows:
        raise ValueError(f"{rows!r} has {rows.rows} rows, got {values.shape[0]} to write")
    whole, pos = rows.array(), 0
    for lo, hi in rows.ranges:
        whole[lo:hi] = values[pos : pos + hi - lo]
        pos += hi - lo


def portable(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """``args`` with every ``SharedRows`` replaced for a unit that may not share our memory: inputs by
    an array of their rows, outputs by None (the unit then returns its results by value)."""
    if not any(isinstance(a, SharedRows) for a in args):
        return args
    return tuple(
        (None if a.output else read_rows(a).copy()) if isinstance(a, SharedRows) else a for a in args
    )


def _mapping(name: str) -> mmap.mmap:
    """This process's mapping of segment ``name`` (mapped on first use, kept for the process's life)."""
    mm = _MAPS.get(name)
    if mm is None:
        with _MAPS_LOCK:
            mm = _MAPS.get(name)
            if mm is None:
                try:
                    fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR)
                except FileNotFoundError:
                    raise FileNotFoundError(
                        f"shared segment {name} is not in {SHM_DIR} on this node: rows in shared memory "
                        "reach only units on the controller's node (send portable(args) elsewhere)"
                    ) from None
                try:
                    mm = _MAPS[name] = mmap.mmap(fd, 0)
                finally:
                    os.close(fd)
    return mm


class _Segment:
    __slots__ = ("name", "size", "top", "live")

    def __init__(self, name: str, size: int):
        self.name, self.size, self.top, self.live = name, size, 0, 0


class _Lease:
    """One region of a segment; the segment is reused from its start when its last lease goes."""

    __slots__ = ("_arena", "_segment")

    def __init__(self, arena: SharedArena, segment: _Segment):
        self._arena, self._segment = arena, segment

    def __del__(self) -> None:
        try:  # noqa: SIM105 (no module lookups here: it may run at interpreter shutdown)
            self._arena._release(self._segment)
        except Exception:  # interpreter shutdown: nothing left to reuse
            pass


class SharedArena:
    """The controller's shared segments (see the module docstring). ``SharedArena.create()`` returns
    None where there is no ``/dev/shm``."""

    def __init__(self, segment_bytes: int = SEGMENT_BYTES):
        self.segment_bytes = segment_bytes
        self._prefix = f"zetta_ray-{os.getpid()}-{secrets.token_hex(4)}"
        self._segments: list[_Segment] = []
        # Leases may be dropped on another thread, or by the garbage collector inside empty() itself.
        self._lock = threading.RLock()
        self._closed = False
        self._warned = False
        self.regions = 0  # regions handed out so far

    @classmethod
    def create(cls, segment_bytes: int = SEGMENT_BYTES) -> SharedArena | None:
        if not os.path.isdir(SHM_DIR):
            return None
        _remove_orphans()
        return cls(segment_bytes)

    def empty(self, shape: tuple[int, ...], dtype: np.dtype | str) -> SharedRows | None:
        """A new region for a ``shape`` array of ``dtype`` (all of its rows), or None when no segment
        can be reserved (the caller then sends its rows through the object store)."""
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        size = -(-max(nbytes, 1) // _ALIGN) * _ALIGN
        with self._lock:
            if self._closed:
                return None
            seg = next((s for s in self._segments if s.top + size <= s.size), None)
            if seg is None:
                seg = self._new_segment(max(size, self.segment_bytes))
                if seg is None:
                    return None
            offset = seg.top
            seg.top += size
            seg.live += 1
            self.regions += 1
        return SharedRows(seg.name, offset, shape, dtype.str, ((0, shape[0]),), lease=_Lease(self, seg))

    def share(self, t: torch.Tensor) -> SharedRows | None:
        """A new region holding a copy of the 2-d tensor ``t``, or None (see ``empty``)."""
        rows = self.empty(tuple(t.shape), t.detach().numpy().dtype)
        if rows is not None:
            rows.tensor().copy_(t)
        return rows

    @property
    def nbytes(self) -> int:
        """Shared memory reserved by this arena."""
        return sum(s.size for s in self._segments)

    def close(self) -> None:
        """Remove the segments' names. Mappings stay valid in every process until their last view goes,
        so tensors over them still read correctly; new regions are refused (callers fall back)."""
        with self._lock:
            self._closed = True
            for s in self._segments:
                _unlink(s.name)
            self._segments = []

    def __del__(self) -> None:
        if not self._closed:
            self.close()

    def _new_segment(self, size: int) -> _Segment | None:
        name = f"{self._prefix}-{len(self._segments)}"
        path = os.path.join(SHM_DIR, name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as e:
            self._warn(f"cannot create {path}: {e}")
            return None
        try:
            # Reserve the pages now: a tmpfs file that is only truncated to size kills the process that
            # touches a page beyond the space left (SIGBUS) instead of failing here.
            os.posix_fallocate(fd, 0, size)
            with _MAPS_LOCK:
                _MAPS[name] = mmap.mmap(fd, size)
        except OSError as e:
            os.close(fd)
            _unlink(name)
            self._warn(f"cannot reserve {size >> 20} MiB in {SHM_DIR}: {e}")
            return None
        os.close(fd)
        seg = _Segment(name, size)
        self._segments.append(seg)
        return seg

    def _release(self, seg: _Segment) -> None:
        with self._lock:
            seg.live -= 1
            if seg.live == 0:
                seg.top = 0  # every region gone: reuse the segment from its start, its pages warm

    def _warn(self, why: str) -> None:
        if not self._warned:
            self._warned = True
            logger.warning(
                "%s; rows go through Ray's object store instead (slower). Give %s more space (docker: "
                "--shm-size) or set RuntimeConfig(shared_memory=False) to silence this.",
                why,
                SHM_DIR,
            )


def _unlink(name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(SHM_DIR, name))


def _remove_orphans(min_age_s: float = 60.0) -> None:
    """Remove segments of controllers on this machine that no longer run (killed before ``close``)."""
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return
    now = time.time()
    for name in names:
        m = _NAME.match(name)
        if m is None or _pid_alive(int(m.group(1))):
            continue
        try:
            if now - os.stat(os.path.join(SHM_DIR, name)).st_mtime >= min_age_s:
                _unlink(name)
        except OSError:
            pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
