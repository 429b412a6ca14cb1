"""How a call's rows reach its unit: shared memory on the controller's node, the object store elsewhere.

The engine groups a layer's rows by expert; each unit gets the row ranges of its experts
(``row_segments``). Units on the controller's node read them from a shared-memory region the controller
wrote once and write their outputs into another in place (``actors/shm.py``), so their calls carry only
descriptors; every other unit gets its rows as an array through Ray's object store. ``RowTransport``
decides per unit, from the unit's first ``ping`` (which names its node), and puts the outputs back in
row order (``combine``).

Touches Ray: ``ray.wait`` / ``ray.get`` on those pings, and the node id of this process.
Shape legend: N = rows grouped by expert, D = model dim
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import ray
import torch

from zetta_ray.actors.shm import SharedArena, SharedRows
from zetta_ray.actors.wire import from_wire
from zetta_ray.runtime.calls import Call

__all__ = ["RowTransport", "SharedPair", "row_segments", "take_rows"]


def row_segments(offsets: list[int], experts: list[int]) -> list[tuple[int, int]]:
    """Row ranges of ``experts`` (ascending), adjacent ranges merged."""
    out: list[tuple[int, int]] = []
    for e in experts:
        lo, hi = offsets[e], offsets[e + 1]
        if out and out[-1][1] == lo:
            out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return out


def take_rows(t: torch.Tensor, segments: list[tuple[int, int]]) -> torch.Tensor:
    """The rows of ``segments`` (a view when there is one segment)."""
    if len(segments) == 1:
        return t[segments[0][0] : segments[0][1]]
    return torch.cat([t[lo:hi] for lo, hi in segments])


def _scatter(outs: list[Any], calls: list[Call], like: torch.Tensor, writable: bool = True) -> torch.Tensor:
    """Put each call's output rows back at its segments.

    Unless ``writable``: when one call carried every row in order, its output is returned as it came,
    read-only memory of the object store (expert outputs, which the MoE layer's combine and its backward
    only read; never gradients, into which autograd may accumulate in place)."""
    if not writable and len(calls) == 1 and calls[0].segments == [(0, like.shape[0])]:
        return from_wire(outs[0])
    out = torch.empty_like(like)  # every row belongs to exactly one call
    _copy_in(out, outs, calls)
    return out


def _copy_in(out: torch.Tensor, outs: list[Any], calls: list[Call]) -> None:
    """Copy the output rows each call returned as an array to its segments of ``out``."""
    for o, c in zip(outs, calls, strict=True):
        if isinstance(o, SharedRows):  # written in place already
            continue
        rows, pos = from_wire(o), 0
        for lo, hi in c.segments:
            out[lo:hi] = rows[pos : pos + hi - lo]
            pos += hi - lo


@dataclass(frozen=True, slots=True)
class SharedPair:
    """A tensor's rows in shared memory (``rows``) and, for calls that return rows, an empty region like
    it (``out``) that the units on this node write their results into. ``local``: the units that were
    known to run on this node when it was made; the others get their rows through the object store."""

    rows: SharedRows
    out: SharedRows | None
    local: frozenset[int]


class RowTransport:
    """Shared memory for the units on the controller's node, the object store for the rest.

    Off (every unit through the object store) until ``open``, which the runtime calls when
    ``RuntimeConfig.shared_memory`` is on; it stays off where ``/dev/shm`` cannot be used.
    """

    def __init__(self, min_bytes: int = 0):
        self.min_bytes = min_bytes  # smaller tensors always travel through the object store
        self._arena: SharedArena | None = None
        self._node = ""
        self._local: dict[int, bool] = {}  # unit -> runs on this node (False until known)
        self._probes: dict[int, ray.ObjectRef] = {}  # unit -> its pending ping, which names its node

    def open(self) -> None:
        """Share memory with units on this node from now on (when ``/dev/shm`` can be used)."""
        self._arena = SharedArena.create()
        self._node = ray.get_runtime_context().get_node_id()

    @property
    def node(self) -> str | None:
        """This process's node id when it shares memory with units there, else None."""
        return self._node if self._arena is not None else None

    @property
    def arena(self) -> SharedArena | None:
        """The shared-memory arena rows are written into for units on this node, or None."""
        return self._arena

    def watch(self, u: int, unit: Any) -> None:
        """A new actor for unit ``u``: it gets rows through the object store until its ping says that it
        runs on this node."""
        if self._arena is not None:
            self._local[u] = False
            self._probes[u] = unit.ping.remote()

    def is_local(self, u: int) -> bool:
        """Whether unit ``u`` runs on this node, as far as its ping has answered yet (never waits)."""
        probe = self._probes.get(u)
        if probe is not None:
            ready, _ = ray.wait([probe], timeout=0)
            if ready:
                del self._probes[u]
                try:
                    self._local[u] = ray.get(probe, timeout=0)["node_id"] == self._node
                except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
                    self._local[u] = False  # dead already: the call itself will report it
        return self._local.get(u, False)

    def treat_as_remote(self, units: Iterable[int]) -> None:
        """Send ``units`` their rows through the object store, as if they ran on another node, until
        they are replaced. A testing hook: it lets one node exercise the path of a cluster (both
        paths, and any mix, must give the same bits)."""
        for u in units:
            self._probes.pop(u, None)
            self._local[u] = False

    def share(self, t: torch.Tensor, units: list[int], output: bool) -> SharedPair | None:
        """``t`` copied into shared memory, and (with ``output``) an empty region like it for the
        results, when any of ``units`` runs on this node; else None."""
        if self._arena is None or t.numel() * t.element_size() < self.min_bytes:
            return None
        local = frozenset(u for u in units if self.is_local(u))
        if not local:
            return None
        shared_in = self._arena.share(t)
        shared_out = self._arena.empty(tuple(t.shape), shared_in.dtype) if shared_in and output else None
        if shared_in is None or (output and shared_out is None):
            return None
        return SharedPair(shared_in, shared_out, local)

    def combine(
        self,
        outs: list[Any],
        calls: list[Call],
        like: torch.Tensor,
        shared: SharedPair | None,
        writable: bool = True,
    ) -> torch.Tensor:
        """The calls' output rows in row order. Units on this node wrote theirs into ``shared.out``
        already; the rows that others returned are copied in."""
        if shared is None:
            return _scatter(outs, calls, like, writable)
        out = shared.out.tensor()
        _copy_in(out, outs, calls)
        return out

    def close(self) -> None:
        if self._arena is not None:
            self._arena.close()
