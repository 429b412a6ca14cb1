"""The shared-memory slot ledger: which snapshot slots (``actors/staging.py``) are busy, and when not.

Where a unit's one target pool runs on the unit's node and that node is the controller's, the unit
copies its snapshot into a slot (a ``/dev/shm`` segment) instead of the object store, and the pool maps
it. A slot is busy from its snapshot's put until the pool has *answered* the ``drop_before`` that
released it (or the put failed, or the pool died: it holds nothing), so nothing a pool holds is ever
overwritten. A slot is ``(unit, incarnation, kind, index)``: ``kind`` is ``"full"`` or ``"record"``,
``incarnation`` counts the unit's replacements (a replacement's slots have new names; the dead unit's
names are unlinked, the pool's mapping keeps what it holds alive).

No Ray here: whether a drop was answered is asked through the ``Cluster`` seam (``control/seams.py``);
slot names are removed from ``/dev/shm`` with ``actors.staging.unlink_slots`` (injectable for tests).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Collection
from typing import Any

from zetta_ray.actors.staging import slot_name, unlink_slots
from zetta_ray.checkpoint import TrickleCheckpoint
from zetta_ray.control.seams import Cluster

__all__ = ["SlotKey", "SlotLedger", "slot_width"]

SlotKey = tuple[int, int, str, int]  # (unit, incarnation, "full" or "record", index)
Targets = tuple[tuple[str, str], ...]  # (pool, node) pairs a snapshot goes to


def slot_width(config: TrickleCheckpoint, kind: str) -> int:
    """How many slots of ``kind`` a unit has. Full: the chain's base, the next base until its commit is
    confirmed (at step 0 the snapshots before and after the optimizer is set), one to spare; records: a
    chain's worth of them and the same margin."""
    return 3 if kind == "full" else config.full_every + 3


class SlotLedger:
    """Busy and free snapshot slots of every unit. See the module docstring."""

    def __init__(
        self,
        config: TrickleCheckpoint,
        cluster: Cluster,
        *,
        prefix: str | None = None,
        unlink: Callable[[str], Any] = unlink_slots,
    ):
        self.config = config
        self.cluster = cluster
        self.node: str | None = None  # the controller's node, when the runtime shares memory
        self.prefix = prefix or f"zetta_ray-{os.getpid()}-{secrets.token_hex(4)}"
        self.busy: dict[SlotKey, int] = {}  # slot -> the step it holds
        self.held: dict[tuple[str, int, int], list[SlotKey]] = {}  # (pool, unit, step) -> slots
        self.freeing: list[tuple[Any, list[SlotKey]]] = []  # a drop sent, its slots
        self.incarnation: dict[int, int] = {}  # unit -> how many times it was replaced
        self.reserved: set[tuple[int, int]] = set()  # (unit, incarnation) whose slots were made up front
        self._unlink = unlink

    def free_slot(self, u: int, node: str, targets: Targets, full: bool) -> SlotKey | None:
        """A slot for unit ``u``'s (on ``node``) next snapshot, or None to send it through the object
        store: a unit gets slots when its one target pool runs on its node and that node is the
        controller's (which removes the slots' names when it closes), and while one is free."""
        if self.node is None or node != self.node or len(targets) != 1 or targets[0][1] != node:
            return None
        kind = "full" if full else "record"
        width = slot_width(self.config, kind)
        incarnation = self.incarnation.get(u, 0)
        free = (key for i in range(width) if (key := (u, incarnation, kind, i)) not in self.busy)
        return next(free, None)

    def name(self, slot: SlotKey) -> str:
        """The ``/dev/shm`` name of ``slot``."""
        return slot_name(self.prefix, *slot)

    def reservation(self, u: int, node: str, targets: Targets) -> dict[str, list[str]] | None:
        """The names of all of unit ``u``'s slots by kind, for the unit to create before its first step
        (a slot's first use costs page faults), or None: the unit stages nothing, or did reserve them.
        Once per incarnation; a replacement makes its slots as it needs them."""
        incarnation = self.incarnation.get(u, 0)
        if (u, incarnation) in self.reserved or self.free_slot(u, node, targets, True) is None:
            return None
        self.reserved.add((u, incarnation))
        return {
            kind: [self.name((u, incarnation, kind, i)) for i in range(slot_width(self.config, kind))]
            for kind in ("record", "full")
        }

    def hold(self, slot: SlotKey, pool: str, unit: int, step: int) -> None:
        """``slot`` carries ``unit``'s snapshot of ``step`` to ``pool``: busy until the pool drops it."""
        self.busy[slot] = step
        self.held.setdefault((pool, unit, step), []).append(slot)

    def release(self) -> None:
        """Free the slots of snapshots whose pool confirmed their drop (or died: it holds nothing)."""
        if not self.freeing:
            return
        done = set(self.cluster.ready([r for r, _ in self.freeing], 0))
        for slot in [slot for ref, slots in self.freeing if ref in done for slot in slots]:
            self.busy.pop(slot, None)
        self.freeing = [f for f in self.freeing if f[0] not in done]

    def forget(self, pool: str, unit: int, step: int) -> None:
        """The pool does not hold (``unit``, ``step``): its put failed. Its slots are free again."""
        for slot in self.held.pop((pool, unit, step), []):
            self.busy.pop(slot, None)

    def forget_pool(self, pool: str) -> None:
        """``pool`` died: it holds nothing now, so every slot it held is free."""
        for key in [k for k in self.held if k[0] == pool]:
            self.forget(*key)

    def free_after(self, drop: Any, pool: str, unit: int, keep: int, in_flight: Collection[Any]) -> None:
        """``drop`` is ``pool``'s ``drop_before(unit, keep)``: once it is answered, the slots of the
        unit's steps before ``keep`` in that pool are free (not those of puts still in flight)."""
        held = [k for k in self.held if k[:2] == (pool, unit) and k[2] < keep and k not in in_flight]
        if held:
            self.freeing.append((drop, [slot for k in held for slot in self.held.pop(k)]))

    def retire(self, u: int) -> None:
        """Unit ``u`` was replaced: remove its slots' names (the pool keeps what it holds mapped); the
        replacement's slots get names of the next incarnation."""
        incarnation = self.incarnation.get(u, 0)
        self._unlink(f"{self.prefix}-{u}.{incarnation}.")
        self.incarnation[u] = incarnation + 1

    def close(self) -> None:
        """Remove every slot name of this controller (only where slots were used)."""
        if self.node is not None:
            self._unlink(self.prefix + "-")
