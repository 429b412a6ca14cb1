"""The fault manager: carries out trickle checkpointing and recovery for one ``ExpertRuntime``.

This is the Ray-facing half of ``control/``; the decisions themselves come from the pure policies beside
it (``decide_replica_nodes``, ``decide_recovery``, ``ReplayLog``). The protocol (docs/recovery.md):

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

import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from zetta_ray.actors.memory_pool import MemoryPoolActor
from zetta_ray.actors.staging import slot_name, unlink_slots
from zetta_ray.checkpoint import TrickleCheckpoint
from zetta_ray.control.durable import DurableCheckpointer
from zetta_ray.control.faults import fault_from_error
from zetta_ray.control.recovery import RecoveryAction, Replica, Spare, decide_recovery
from zetta_ray.control.replay import ReplayLog
from zetta_ray.control.replicas import decide_replica_nodes
from zetta_ray.control.rounds import SnapshotRound, plan_commit
from zetta_ray.errors import (
    PoolFullError,
    RecoveryFailed,
    SnapshotNotHeldError,
    UnitFailed,
    UnitFault,
    ZettaError,
)
from zetta_ray.runtime.engine import by_value

__all__ = ["FaultManager", "RecoveryEvent", "RecoveryFailed"]

logger = logging.getLogger(__name__)

_MAX_ATTEMPTS = 5  # recoveries of one unit within one wait before giving up
_PROBE_TIMEOUT_S = 2.0  # a raylet that does not accept a connection in this long is taken for dead


@dataclass(frozen=True, slots=True)
class RecoveryEvent:
    """One fault and what was done about it, for reports and the chaos tool."""

    unit: int
    kind: str
    step: int
    phase: str
    action: str
    node: str | None
    restored_step: int | None
    replayed_calls: int
    redone_records: int  # optimizer steps redone from gradient records on top of a full snapshot
    recovery_s: float
    detail: str


SlotKey = tuple[int, int, str, int]  # (unit, incarnation, "full" or "record", index)


def _slot_width(config: TrickleCheckpoint, kind: str) -> int:
    """How many slots of ``kind`` a unit has. Full: the chain's base, the next base until its commit is
    confirmed (at step 0 the snapshots before and after the optimizer is set), one to spare; records: a
    chain's worth of them and the same margin."""
    return 3 if kind == "full" else config.full_every + 3


@dataclass(slots=True)
class _Put:
    unit: int
    step: int
    pool: str
    node: str
    ref: ray.ObjectRef
    sent: float
    round: SnapshotRound
    base: int  # the step of the full snapshot it restores from: ``step`` itself, or a record's chain start
    slot: SlotKey | None = None  # the shared-memory slot the unit copied it into (actors/staging.py)


@dataclass(frozen=True, slots=True)
class _Chain:
    """A unit's gradient records build on its full snapshot of step ``base``, sent to ``targets``; the
    newest snapshot sent is of step ``last``."""

    base: int
    last: int
    targets: tuple[tuple[str, str], ...]


@dataclass(slots=True)
class _Restoring:
    """A replacement that was started and sent its restore, not yet waited for."""

    new: Any
    node: str
    fault: Any
    decision: Any
    restored: list[ray.ObjectRef]  # one per snapshot restored: the full one, then the records after it


def raylet_answers(node: dict[str, Any]) -> bool:
    """Whether the raylet of ``node`` (a ``ray.nodes()`` entry) accepts a TCP connection. The kernel
    accepts for a live raylet however busy it is; a killed one refuses at once, a dead host times out."""
    try:
        with socket.create_connection(
            (node["NodeManagerAddress"], node["NodeManagerPort"]), timeout=_PROBE_TIMEOUT_S
        ):
            return True
    except OSError:
        return False


def _lost_with_node(runtime: Any, u: int, error: UnitFault) -> UnitFailed:
    """The fault of unit ``u``, lost because the node of ``error``'s unit died."""
    cause = RuntimeError(f"its node died with unit {error.unit} ({error})")
    return UnitFailed(
        unit=u, experts=runtime.layout.experts_of(u), step=error.step, phase=error.phase, cause=cause
    )


class FaultManager:
    """Owns the MemoryPool actors, the replay journal and the recovery of one runtime's units."""

    def __init__(
        self,
        config: TrickleCheckpoint,
        *,
        unit_nodes: list[str],
        spares: list[tuple[dict[str, Any], str]] = (),
        deadline_s: float = 60.0,
        start_deadline_s: float = 180.0,
    ):
        self.config = config
        self.log = ReplayLog()
        self.unit_nodes = list(unit_nodes)
        self.spares = list(spares)  # (actor options of a reserved bundle, its node)
        self.deadline_s = deadline_s
        self.start_deadline_s = max(start_deadline_s, deadline_s)  # a replacement starts, then restores
        self.events: list[RecoveryEvent] = []
        self.acked: dict[int, list[Replica]] = {}
        self.pools: dict[str, Any] = {}
        self.pool_nodes: dict[str, str] = {}
        self.dead_pools: set[str] = set()
        self.dead_nodes: set[str] = set()  # found dead before the cluster said so (see _live_nodes)
        self.full_pools: set[str] = set()  # refused a full snapshot since the last commit: tried last
        self._degraded: set[tuple[int, bool, frozenset[str]]] = set()  # warned about (_warn_degraded)
        self._refused: dict[int, str] = {}  # unit -> why a pool refused its full snapshot since the commit
        self._puts: list[_Put] = []
        self._rounds: list[SnapshotRound] = []
        self._targets: dict[tuple[Any, ...], tuple[tuple[str, str], ...]] = {}
        self._chains: dict[int, _Chain] = {}  # unit -> what its next gradient record would build on
        self._broken: set[int] = set()  # units whose chain lost a put: their next snapshot is full
        self.committed_step = -1  # the newest step whose snapshots are stored on all their replicas
        # Shared-memory slots (actors/staging.py) for units whose one pool runs on their node, which is
        # the controller's: a slot is busy from its snapshot's put until its pool confirmed the drop.
        self._stage_node: str | None = None  # the controller's node, when the runtime shares memory
        self._stage_prefix = f"zetta_ray-{os.getpid()}-{secrets.token_hex(4)}"
        self._slot_busy: dict[SlotKey, int] = {}  # slot -> the step it holds
        self._slots_held: dict[tuple[str, int, int], list[SlotKey]] = {}  # (pool, unit, step) -> slots
        self._freeing: list[tuple[ray.ObjectRef, list[SlotKey]]] = []  # a drop sent, its slots
        self._incarnation: dict[int, int] = {}  # unit -> how many times it was replaced
        self._reserved: set[tuple[int, int]] = set()  # (unit, incarnation) whose slots were made up front
        self.durable = (
            DurableCheckpointer(config, deadline_s=deadline_s) if config.durable_uri is not None else None
        )
        for node in sorted(self._live_nodes()):
            self._start_pool(node)
        try:  # pools start while the units do; a unit lost before its first snapshot is unrecoverable
            ray.get([h.ping.remote() for h in self.pools.values()], timeout=max(deadline_s, 120.0))
        except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError) as e:
            self.close()
            raise RecoveryFailed(f"the MemoryPool actors did not start: {e}") from e

    def _start_pool(self, node: str) -> None:
        pid = f"pool-{node[:8]}-{len(self.pools)}"
        self.pools[pid] = MemoryPoolActor.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)
        ).remote(self.config.pool_bytes, pid)
        self.pool_nodes[pid] = node

    def attach(self, runtime: Any) -> None:
        runtime.journal = self.log
        runtime.supervisor = self
        self._stage_node = runtime.node

    # -- trickle checkpointing --------------------------------------------------------------------------

    def after_step(self, runtime: Any) -> None:
        """Collect acknowledgements, commit what is stored, and snapshot if this step is due."""
        self._collect()
        self._check_room(runtime.step)
        if runtime.step % self.config.every == 0:
            self.snapshot(runtime)

    def _check_room(self, step: int) -> None:
        """Raise when full snapshots have been refused for lack of room and nothing was committed for
        two chains' worth of steps: the pools cannot hold every unit's state at once, and going on would
        leave the job without a recent snapshot or a durable checkpoint (the journal growing meanwhile)."""
        since = max(self.committed_step, 0)
        if self._refused and step - since > 2 * self.config.full_every * self.config.every:
            units = sorted(self._refused)
            raise RecoveryFailed(
                f"no snapshot was committed in the {step - since} steps since step {since}: the MemoryPool "
                f"actors have no room for the full snapshots of units {units} ({self._refused[units[0]]}). "
                f"Raise TrickleCheckpoint(pool_bytes=...) (now {self.config.pool_bytes} bytes per pool), "
                "add nodes, or give fewer experts to each unit; the last durable checkpoint, if any, is "
                "intact"
            )

    def snapshot(
        self, runtime: Any, wait: bool = False, units: list[int] | None = None, full: bool = False
    ) -> None:
        """Ask every unit (or those in ``units``) for its state after ``runtime.step`` optimizer steps and
        store it on R pools. Ray runs the call after the calls sent so far, so a unit in the middle of a
        step (a replacement that was just replayed) is snapshotted as of its last optimizer step.

        A unit's snapshot is a gradient record when ``_record_base`` allows (``full``, ``wait`` and
        ``units`` ask for full snapshots: a replacement mid-step has no gradients of the last step).
        ``wait`` blocks until the copies are stored (the step-0 snapshot does, so that a unit lost before
        its first step can already be restored)."""
        step = runtime.step
        if wait and units is None:
            self._reserve_slots(runtime)
        full = full or wait or units is not None
        round_ = SnapshotRound(step, partial=units is not None)
        now = time.monotonic()
        for u, unit in enumerate(runtime.units):
            if units is not None and u not in units:
                continue
            targets = self._replica_targets(u)
            base = None if full else self._record_base(u, step, targets)
            slot = self._free_slot(u, targets, full=base is None)
            if base is None:  # either way the blob is owned here; the unit writes it once, pools hold it
                base = step
                if slot is None:
                    blob = unit.snapshot.remote(step, False)
                else:
                    blob = unit.stage_snapshot.remote(step, self._slot_name(slot))
                self._broken.discard(u)
            elif slot is None:
                blob = unit.gradient_record.remote(step, False)
            else:
                blob = unit.stage_gradients.remote(step, self._slot_name(slot))
            self._chains[u] = _Chain(base, step, targets)
            round_.waiting[u] = len(targets)
            for pool, node in targets:
                ref = self.pools[pool].put.remote(u, step, blob)
                self._puts.append(_Put(u, step, pool, node, ref, now, round_, base, slot))
                if slot is not None:
                    self._slot_busy[slot] = step
                    self._slots_held.setdefault((pool, u, step), []).append(slot)
        self._rounds.append(round_)
        if wait:
            deadline = time.monotonic() + self.deadline_s
            while not round_.stored and not round_.refused and time.monotonic() < deadline:
                self._collect(wait_s=0.05)
            if round_.refused:
                raise RecoveryFailed(
                    f"the step-{step} snapshot does not fit in the MemoryPool actors: {round_.refused[0]} "
                    f"Raise TrickleCheckpoint(pool_bytes=...) (now {self.config.pool_bytes} bytes per pool; "
                    "with AdamW a unit's full snapshot after its first step is about 3x its step-0 one), "
                    "add nodes, or give fewer experts to each unit"
                )
            if not round_.stored:
                raise RecoveryFailed(
                    f"the step-{step} snapshot was not stored within {self.deadline_s:g} s "
                    f"(acknowledgements missing: {round_.waiting}); check the MemoryPool actors"
                )

    def _free_slot(self, u: int, targets: tuple[tuple[str, str], ...], full: bool) -> SlotKey | None:
        """A shared-memory slot for unit ``u``'s next snapshot, or None to send it through the object
        store: a unit gets slots when its one target pool runs on its node and that node is the
        controller's (which removes the slots' names when it closes), and while one is free."""
        node = self.unit_nodes[u]
        if self._stage_node is None or node != self._stage_node or len(targets) != 1 or targets[0][1] != node:
            return None
        kind = "full" if full else "record"
        width = _slot_width(self.config, kind)
        incarnation = self._incarnation.get(u, 0)
        free = (key for i in range(width) if (key := (u, incarnation, kind, i)) not in self._slot_busy)
        return next(free, None)

    def _reserve_slots(self, runtime: Any) -> None:
        """Have each unit that will stage its snapshots create all its slots before the first step (a
        slot's first use costs page faults; BENCHMARKS.md, issue 4). Once per unit; a replacement makes
        its slots as it needs them (its recovery should not wait for them)."""
        for u, unit in enumerate(runtime.units):
            incarnation = self._incarnation.get(u, 0)
            targets = self._replica_targets(u)
            if (u, incarnation) in self._reserved or self._free_slot(u, targets, True) is None:
                continue
            self._reserved.add((u, incarnation))
            names = {
                kind: [
                    self._slot_name((u, incarnation, kind, i)) for i in range(_slot_width(self.config, kind))
                ]
                for kind in ("record", "full")
            }
            # Ray runs it before the snapshot that follows; records only where there will be any
            unit.reserve_slots.remote(names["record"] if self.config.every == 1 else [], names["full"])

    def _slot_name(self, slot: SlotKey) -> str:
        return slot_name(self._stage_prefix, *slot)

    def _release_slots(self) -> None:
        """Free the slots of snapshots whose pool confirmed their drop (or died: it holds nothing)."""
        if not self._freeing:
            return
        ready, _ = ray.wait([r for r, _ in self._freeing], num_returns=len(self._freeing), timeout=0)
        done = set(ready)
        for slot in [slot for ref, slots in self._freeing if ref in done for slot in slots]:
            self._slot_busy.pop(slot, None)
        self._freeing = [f for f in self._freeing if f[0] not in done]

    def _forget_slots(self, pool: str, unit: int, step: int) -> None:
        """The pool does not hold (``unit``, ``step``): its put failed. Its slots are free again."""
        for slot in self._slots_held.pop((pool, unit, step), []):
            self._slot_busy.pop(slot, None)

    def _record_base(self, u: int, step: int, targets: tuple[tuple[str, str], ...]) -> int | None:
        """The full snapshot that a gradient record of unit ``u``'s step ``step`` would build on, or None
        when the snapshot must be full: records are off (``full_every=1``, or ``every`` > 1 leaves steps
        without a record), the chain is ``full_every`` long, a put of it failed, its last snapshot is not
        of the step before, or its pools changed (a record is useless where its chain is not)."""
        chain = self._chains.get(u)
        if (
            self.config.every != 1
            or chain is None
            or u in self._broken
            or chain.targets != targets
            or chain.last != step - 1
            or step - chain.base >= self.config.full_every
        ):
            return None
        return chain.base

    def _replica_targets(self, u: int) -> tuple[tuple[str, str], ...]:
        """Where unit ``u``'s next snapshot goes; decided again only when the pools change.

        No cluster query on this per-step path: a pool whose put fails is checked and replaced, and
        recovery marks the pools of dead nodes, so ``dead_pools`` is what changes."""
        live_pools = {p: n for p, n in self.pool_nodes.items() if p not in self.dead_pools}
        key = (u, self.unit_nodes[u], tuple(sorted(live_pools.items())), frozenset(self.full_pools))
        if key not in self._targets:
            full = self.full_pools
            if set(live_pools) <= full:  # every pool refused a snapshot lately: one may have room now
                full = set()
            targets = decide_replica_nodes(
                self.unit_nodes[u], live_pools, self.config.replicas, full_pools=full, key=u, quiet=True
            )
            self._targets[key] = targets
            self._warn_degraded(u, targets, live_pools)
        return self._targets[key]

    def _warn_degraded(self, u: int, targets: tuple[tuple[str, str], ...], pools: dict[str, str]) -> None:
        """Warn once per situation (not once per unit) when unit ``u``'s snapshots get fewer than R
        replicas, or one on its own node."""
        own = any(n == self.unit_nodes[u] for _, n in targets)
        if len(targets) >= self.config.replicas and not own:
            return
        situation = (len(targets), own, frozenset(pools.values()))
        if situation in self._degraded:
            return
        self._degraded.add(situation)
        nodes = len(set(pools.values()))
        if own:
            logger.warning(
                "snapshots go to the MemoryPool on the unit's own node (unit %d, and others like it): "
                "TrickleCheckpoint(replicas=%d) needs %d other node(s) with a pool with room, and %d "
                "node(s) run one. A node failure loses its units and their snapshots together; add "
                "nodes for replicas that survive it",
                u,
                self.config.replicas,
                self.config.replicas,
                nodes,
            )
        else:
            logger.warning(
                "unit %d's snapshots (and others like it) go to %d other node(s), not "
                "TrickleCheckpoint(replicas=%d): %d node(s) run a MemoryPool. Add nodes or "
                "lower replicas",
                u,
                len(targets),
                self.config.replicas,
                nodes,
            )

    def _collect(self, wait_s: float = 0.0) -> None:
        """Take in finished puts; a put past the deadline or failed is logged and not counted."""
        self._release_slots()
        if not self._puts:
            return
        refs = [p.ref for p in self._puts]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=wait_s)
        done = set(ready)
        now = time.monotonic()
        still = []
        for put in self._puts:
            if put.ref not in done:
                if now - put.sent > self.deadline_s:
                    logger.warning(
                        "snapshot of unit %d step %d to %s timed out", put.unit, put.step, put.pool
                    )
                    self._broken.add(put.unit)
                    put.round.lost = True
                else:
                    still.append(put)
                continue
            try:
                ray.get(put.ref, timeout=self.deadline_s)
            except PoolFullError as e:
                self._forget_slots(put.pool, put.unit, put.step)
                self._broken.add(put.unit)
                put.round.lost = True
                why = str(getattr(e, "cause", e))  # the pool's own message, without Ray's traceback
                if put.base != put.step:
                    # a record that does not fit beside its chain: the next full snapshot may evict it
                    logger.info("pool %s has no room for a gradient record: %s", put.pool, why)
                else:
                    self.full_pools.add(put.pool)
                    put.round.refused.append(why)
                    if put.unit not in self._refused:
                        logger.warning(
                            "unit %d's full snapshot of step %d does not fit in pool %s; until one fits, "
                            "nothing newer is committed: %s",
                            put.unit,
                            put.step,
                            put.pool,
                            why,
                        )
                    self._refused[put.unit] = why
                continue
            except ray.exceptions.RayError as e:
                self._forget_slots(put.pool, put.unit, put.step)  # not stored: the pool or the blob failed
                self._broken.add(put.unit)
                put.round.lost = True
                # Not proof the pool died: the unit that made the blob may be the one that did.
                logger.warning(
                    "snapshot of unit %d step %d to %s failed: %s",
                    put.unit,
                    put.step,
                    put.pool,
                    str(e).splitlines()[0],
                )
                if put.pool not in self.dead_pools and not self._pool_alive(put.pool):
                    self._replace_pool(put.pool)
                continue
            self._acknowledge(put)
            put.round.waiting[put.unit] -= 1
        self._puts = still
        wanted = [s.step for s in self.durable.staged] if self.durable is not None else []
        plan = plan_commit(self._rounds, self.acked, committed=self.committed_step, wanted=wanted)
        self._rounds = list(plan.keep)
        for r in plan.partial:
            self._commit(r.step, units=list(r.waiting))
        for step in plan.durable:  # oldest first: writing a newer one gives up on older staged ones
            self._write_durable(step)
        for step in plan.abandoned:
            self.durable.abandon(step)
        if plan.step is not None:
            self._commit(plan.step)

    def _acknowledge(self, put: _Put) -> None:
        """Count ``put``'s replica as stored. A pool keeps a full snapshot over a record of the same step
        (``MemoryPool.put``), and so does this count."""
        held = self.acked.setdefault(put.unit, [])
        same = [r for r in held if r.pool == put.pool and r.step == put.step]
        if any(r.start == r.step for r in same):
            return
        held[:] = [r for r in held if r not in same]
        held.append(Replica(put.pool, put.node, put.step, put.base))

    def _drop_puts(self, doomed: Callable[[_Put], bool]) -> None:
        """Stop waiting for the puts in flight that ``doomed(put)`` says will never land; like failed
        puts, they are not counted as stored (their round stays incomplete, a later one commits)."""
        kept = []
        for put in self._puts:
            if not doomed(put):
                kept.append(put)
                continue
            self._broken.add(put.unit)
            put.round.lost = True
            logger.warning(
                "snapshot of unit %d step %d to %s abandoned: its unit's or pool's node is dead",
                put.unit,
                put.step,
                put.pool,
            )
        self._puts = kept

    def lost_units(self, units: list[int]) -> list[int]:
        """Those of ``units`` whose node is dead, asking each node's raylet (see ``_live_nodes``).

        The runtime asks while a wait drags on: a call to an actor on a node that died between two calls
        fails only when the cluster declares the node dead (about 15 s with Ray's default health checks),
        but the node's raylet refuses connections at once."""
        alive = self._live_nodes(suspects={self.unit_nodes[u] for u in units})
        return [u for u in units if self.unit_nodes[u] not in alive]

    def _live_nodes(self, suspects: Iterable[str] = ()) -> set[str]:
        """The nodes the cluster reports alive, less the ones found dead here.

        ``suspects`` are nodes of actors that just failed or do not answer. The cluster declares a node
        dead only after its health checks miss (1.5 s to 15 s, by its settings); until then a unit lost
        with its node looks like a unit lost alone, and its node's other units and replicas look usable.
        So a suspect's raylet is asked directly: one that refuses a connection is dead now, and stays
        dead (Ray gives a restarted raylet a new node id)."""
        nodes = ray.nodes()
        alive = {n["NodeID"] for n in nodes if n["Alive"]} - self.dead_nodes
        by_id = {n["NodeID"]: n for n in nodes}
        for node in set(suspects):
            if node in alive and not raylet_answers(by_id[node]):
                logger.warning("node %s: its raylet does not answer; taking the node for dead", node)
                self.dead_nodes.add(node)
                alive.discard(node)
        return alive

    def _pool_alive(self, pool: str) -> bool:
        try:
            ray.get(self.pools[pool].ping.remote(), timeout=5.0)
            return True
        except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
            return False

    def _replace_pool(self, pool: str) -> None:
        """A MemoryPool died: its replicas are gone; a new pool on the same node (if it lives) takes
        the next snapshots."""
        self.dead_pools.add(pool)
        for key in [k for k in self._slots_held if k[0] == pool]:  # it holds nothing now
            self._forget_slots(*key)
        node = self.pool_nodes[pool]
        alive = self._live_nodes(suspects=[node])
        logger.warning("MemoryPool %s died; %s", pool, "starting a new one" if node in alive else "node gone")
        if node in alive:
            self._start_pool(node)

    def _commit(self, step: int, units: list[int] | None = None) -> None:
        """Drop what the snapshots of ``step`` (of every unit, or of ``units``) make unnecessary: older
        journal calls and older copies (only in the pools that hold them)."""
        if units is not None:
            for u in units:
                self.log.commit(step, unit=u)
            self._drop_stale(step, units)
            return
        self.log.commit(step)
        self.committed_step = max(self.committed_step, step)
        self.full_pools.clear()  # the drops below free room: a pool that refused may take the next one
        self._refused.clear()
        self._drop_stale(step, list(self.acked))

    def _write_durable(self, step: int) -> None:
        """Write the durable checkpoint staged for ``step`` if every unit's full snapshot of ``step`` is
        stored (a step whose units sent records gets its full snapshots from ``stage_durable``)."""
        if self.durable is None or not self.durable.wants(step):
            return
        full = {u: [r for r in rs if r.step == step == r.start] for u, rs in self.acked.items()}
        if all(full.values()):
            fetch = {  # sent now, so that a later drop_before cannot overtake them
                u: [self.pools[r.pool].get.remote(u, step) for r in rs] for u, rs in full.items()
            }
            self.durable.commit(step, fetch)

    def _drop_stale(self, step: int, units: list[int]) -> None:
        """Forget the replicas that restoring ``step`` does not need: those before the full snapshot that
        each unit's replicas of ``step`` start from, and before the oldest step a staged durable
        checkpoint is still to be made of."""
        floor = [min(s.step for s in self.durable.staged)] if self.durable and self.durable.staged else []
        stale = set()
        for u in units:
            replicas = self.acked.get(u, [])
            keep = min((r.start for r in replicas if r.step == step), default=step)
            keep = min([keep, *floor])
            stale |= {(r.pool, u, keep) for r in replicas if r.step < keep and r.pool not in self.dead_pools}
            self.acked[u] = [r for r in replicas if r.step >= keep]
        in_flight = {(p.pool, p.unit, p.step) for p in self._puts}
        for pool, u, keep in sorted(stale):
            ref = self.pools[pool].drop_before.remote(u, keep)  # housekeeping; only slots wait for it
            held = [k for k in self._slots_held if k[:2] == (pool, u) and k[2] < keep and k not in in_flight]
            if held:
                self._freeing.append((ref, [slot for k in held for slot in self._slots_held.pop(k)]))

    # -- recovery -----------------------------------------------------------------------------------------

    def recover(self, runtime: Any, error: UnitFault, calls: list[Any]) -> None:
        """Replace the failed unit of ``error`` and re-send its calls in ``calls``; raise if impossible.

        When the unit's node is dead, every other unit of that node is lost too: all their replacements
        start at once (a replacement's start, a fresh process importing torch, is most of a recovery), so
        a node fault takes about as long as one unit's. Each replacement is restored before anything is
        replayed onto it; a replica that cannot be read (its pool or node died meanwhile) is marked dead
        and the decision is taken again.
        """
        start = time.monotonic()
        node = self.unit_nodes[error.unit]
        alive = self._live_nodes(suspects=[node])
        lost = [error.unit]
        if node not in alive:
            lost += [v for v, n in enumerate(self.unit_nodes) if n == node and v != error.unit]
        for u in lost:
            ray.kill(runtime.units[u], no_restart=True)  # dead already, or stalled: either way it goes
        # Snapshots in flight may land now (or fail, if the dead unit made them): count what landed.
        deadline = time.monotonic() + self.deadline_s
        self._collect()
        if node not in alive:
            # A blob made on the dead node, or a pool there, cannot answer, and Ray fails such a put only
            # once it declares the node dead (about 15 s with its default health checks): drop them now.
            self._drop_puts(lambda p: p.unit in lost or p.node == node)
        while self._puts and time.monotonic() < deadline:
            self._collect(wait_s=0.05)
        errors = {u: error if u == error.unit else _lost_with_node(runtime, u, error) for u in lost}
        alive = self._live_nodes()  # again: the wait above may be long
        started: dict[int, _Restoring] = {}
        try:
            for u in lost:  # all replacements boot at the same time
                started[u] = self._begin(runtime, u, errors[u], alive)
            for u in lost:
                self._finish(runtime, u, errors[u], calls, start, started[u])
        except RecoveryFailed:
            for u, begun in started.items():  # no orphan actors when the job cannot go on
                if runtime.units[u] is not begun.new:
                    ray.kill(begun.new, no_restart=True)
            raise

    def _begin(self, runtime: Any, u: int, error: UnitFault, alive: set[str] | None = None) -> _Restoring:
        """Decide where unit ``u`` goes, start its replacement and send the restore; do not wait.
        ``alive``: the live nodes, when the caller has just asked (else asked here)."""
        if alive is None:
            alive = self._live_nodes()
        old_node = self.unit_nodes[u]
        fault = fault_from_error(error, node=old_node, node_alive=old_node in alive)
        self.dead_pools |= {p for p, n in self.pool_nodes.items() if n not in alive}
        decision = decide_recovery(
            fault,
            live_nodes=alive,
            replicas_by_unit=self.acked,
            spares=[Spare(i, node) for i, (_, node) in enumerate(self.spares)],
            dead_pools=self.dead_pools,
            log_start=self.log.first_step(u),
        )
        if decision.action is RecoveryAction.FAIL:
            raise RecoveryFailed(f"cannot recover unit {u}: {decision.reason}") from error
        new, node = self._start_replacement(runtime, u, decision, old_node)
        replica, pool = decision.restore_from, self.pools[decision.restore_from.pool]
        # the full snapshot, then the records after it: Ray runs one caller's calls to an actor in order
        restored = [new.restore.remote(pool.get.remote(u, s)) for s in range(replica.start, replica.step + 1)]
        return _Restoring(new, node, fault, decision, restored)

    def _finish(
        self, runtime: Any, u: int, error: UnitFault, calls: list[Any], start: float, begun: _Restoring
    ) -> None:
        """Wait for unit ``u``'s restore (trying again from scratch if it fails), replay its journal onto
        it, and re-send its calls in ``calls``."""
        for attempt in range(_MAX_ATTEMPTS):
            if attempt:
                begun = self._begin(runtime, u, error)
            replica = begun.decision.restore_from
            try:
                ray.get(begun.restored, timeout=self.start_deadline_s)
                break
            except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError) as e:
                # The pool, or the replacement (slow to start, or dead on arrival): blame the pool only
                # if it does not answer, or its replica is gone for good.
                pool_gone = not self._pool_alive(replica.pool)
                logger.warning(
                    "restoring unit %d from %s failed (%s), trying again: %s",
                    u,
                    replica.pool,
                    "pool gone" if pool_gone else "pool alive",
                    str(e).splitlines()[0],
                )
                if pool_gone:
                    self.dead_pools.add(replica.pool)
                elif isinstance(getattr(e, "cause", None), SnapshotNotHeldError):
                    # a step of its chain is gone from that pool: none of the pool's copies is usable
                    self.acked[u] = [r for r in self.acked.get(u, []) if r.pool != replica.pool]
                ray.kill(begun.new, no_restart=True)
        else:
            raise RecoveryFailed(
                f"unit {u}: no replica could be restored in {_MAX_ATTEMPTS} attempts"
            ) from error
        new, node, fault, decision = begun.new, begun.node, begun.fault, begun.decision
        replay = self.log.calls_for(u, decision.replay_since)
        # by value: the replacement may run on another node than the shared memory the calls named, and
        # must not pull rows from where their first copies went (see runtime.engine.by_value)
        fresh = {id(c): getattr(new, c.method).remote(*by_value(c.args, self.deadline_s)) for c in replay}
        runtime.units[u] = new
        self.unit_nodes[u] = node
        # the dead unit's slots: the pool keeps what it holds mapped; their names can go
        incarnation = self._incarnation.get(u, 0)
        unlink_slots(f"{self._stage_prefix}-{u}.{incarnation}.")
        self._incarnation[u] = incarnation + 1
        # Snapshot the replacement at once (Ray runs it after the replayed calls): until then its
        # newest stored state is the one just restored, and losing it again would replay more.
        if replica.step < runtime.step:
            self.snapshot(runtime, units=[u])
        for c in calls:
            if c.unit == u:
                if c.logged is not None and id(c.logged) in fresh:
                    c.ref = fresh[id(c.logged)]
                else:
                    runtime.resend(c)
        self.events.append(
            RecoveryEvent(
                unit=u,
                kind=fault.kind,
                step=error.step,
                phase=error.phase,
                action=decision.action.value,
                node=node,
                restored_step=replica.step,
                replayed_calls=len(replay),
                redone_records=replica.step - replica.start,
                recovery_s=time.monotonic() - start,
                detail=str(error),
            )
        )
        logger.warning(
            "recovered unit %d (%s in %s at step %d) on node %s from snapshot %d (%d gradient records "
            "redone), replaying %d calls",
            u,
            fault.kind,
            error.phase,
            error.step,
            node[:8],
            replica.step,
            replica.step - replica.start,
            len(replay),
        )

    def _start_replacement(self, runtime: Any, u: int, decision: Any, old_node: str) -> tuple[Any, str]:
        if decision.action is RecoveryAction.REPLACE_ON_SPARE:
            options, node = self.spares.pop(decision.spare.slot)
            return runtime.start_unit(u, **options), node
        if decision.node == old_node:
            return runtime.start_unit(u), old_node  # its own bundle is free again
        strategy = NodeAffinitySchedulingStrategy(decision.node, soft=False)
        return runtime.start_unit(u, num_cpus=0, resources=None, scheduling_strategy=strategy), decision.node

    # -- durable checkpoints (control/durable.py) --------------------------------------------------------

    def stage_durable(self, runtime: Any, dense: Any) -> None:
        """Write a durable checkpoint of the current step with ``dense`` (the controller's part) once the
        units' snapshots of this step are stored (snapshotting now if this step has none)."""
        step = runtime.step
        self.durable.stage(step, dense)
        if not all(u in self._chains and self._chains[u].base == step for u in range(len(runtime.units))):
            self.snapshot(runtime, full=True)  # none this step, or records: a checkpoint needs full state
        elif step <= self.committed_step:  # its snapshots landed already
            self._write_durable(step)

    def finish_durable(self) -> None:
        """Wait until every staged durable checkpoint is written; raise if one could not be."""
        deadline = time.monotonic() + self.deadline_s
        while self.durable.staged and self._puts and time.monotonic() < deadline:
            self._collect(wait_s=0.05)
        if self.durable.staged:
            steps = [s.step for s in self.durable.staged]
            raise RecoveryFailed(
                f"the snapshots of step(s) {steps} were not stored within {self.deadline_s:g} s, so their "
                "durable checkpoints could not be written; check the MemoryPool actors"
            )
        self.durable.flush()

    def restarted_at(self, runtime: Any) -> None:
        """The units were restored to ``runtime.step`` from a durable checkpoint: snapshot that state
        (recovery restores from it) and count the durable schedule from there."""
        self.snapshot(runtime, wait=True)
        if self.durable is not None:
            self.durable.restart_at(runtime.step)

    def close(self) -> None:
        try:
            if self.durable is not None:  # staged checkpoints need the pools: finish them first
                try:
                    self.finish_durable()
                except ZettaError as e:
                    logger.error("closing with durable checkpoints unwritten: %s", e)
                try:
                    self.durable.close()
                except ZettaError as e:
                    logger.error("a durable checkpoint write failed: %s", e)
        finally:
            self._kill_pools()
            if self._stage_node is not None:
                unlink_slots(self._stage_prefix + "-")

    def _kill_pools(self) -> None:
        for handle in self.pools.values():
            ray.kill(handle, no_restart=True)
        self.pools.clear()
