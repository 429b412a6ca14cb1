"""Recovery policy: where a failed unit's replacement goes and which snapshot it restores.

``decide_recovery`` is a pure function of a ``Fault`` and the cluster as the controller sees it. It
returns a ``RecoveryDecision``: an action, the node (and spare bundle) for the replacement, the
snapshot replica to restore from and the step to replay from, and a reason for the log. Nothing here
talks to Ray; the controller carries the decision out (docs/recovery.md).

The rules, in order:

1. A unit that raised an error of its own is not replaced: replaying its calls would raise it again.
2. Restore the newest step held by a surviving replica: its pool is not dead and its node is live. A
   gradient record counts only where the same pool holds its whole chain (the full snapshot it starts
   from and every record after it). A replica older than the replay log's first step cannot be brought
   forward and does not count. Ties go to the replica on the replacement's own node (a local read),
   then to the lowest pool id.
3. Put the replacement on a spare bundle (on a live node) if there is one, else on a live node with a
   free slot. Either way, prefer nodes that hold no replica of this unit: a replacement that shares a
   node with its own replica loses both when that node dies. Among nodes, prefer one other than where
   the unit failed, then the most free slots, then the lowest node id.
4. With no surviving replica or no room, FAIL, saying why and naming the last durable checkpoint.

A pool fault is repaired by starting a new pool (``REPLACE_POOL``): on the same node when it is still
live (its memory was freed), else on the live node with the fewest pools. Its replicas are gone; the
units it served keep their other replicas until their next snapshot is placed (``decide_replica_nodes``).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from zetta_ray.control.faults import Fault, PoolId

__all__ = ["RecoveryAction", "RecoveryDecision", "Replica", "Spare", "decide_recovery"]

logger = logging.getLogger(__name__)


class RecoveryAction(enum.Enum):
    REPLACE_ON_SPARE = "REPLACE_ON_SPARE"  # start the replacement in a reserved spare bundle
    REPLACE_ON_NODE = "REPLACE_ON_NODE"  # start the replacement on a live node with room
    REPLACE_POOL = "REPLACE_POOL"  # start a new MemoryPool (its replicas are lost)
    FAIL = "FAIL"  # recovery is impossible; stop with the reason


@dataclass(frozen=True, slots=True)
class Replica:
    """A snapshot copy: pool ``pool`` on node ``node`` holds ``step`` of some unit.

    ``base`` is the step of the full snapshot a restore of it starts from: None (or ``step``) for a full
    snapshot; for a gradient record, the full snapshot its chain starts from, after which every step up to
    ``step`` is redone from the same pool's records."""

    pool: PoolId
    node: str
    step: int
    base: int | None = None

    @property
    def start(self) -> int:
        """The step of the full snapshot that restoring this replica loads first."""
        return self.step if self.base is None else self.base


@dataclass(frozen=True, slots=True)
class Spare:
    """A reserved place for a replacement unit: a placement-group bundle (``slot``) on ``node``."""

    slot: object
    node: str


@dataclass(frozen=True, slots=True, kw_only=True)
class RecoveryDecision:
    """What to do about one fault.

    Attributes:
        action: see ``RecoveryAction``.
        reason: why, in one sentence (logged as ``"Deciding to <ACTION>, since <reason>"``).
        node: where the replacement unit or pool goes (None for FAIL).
        spare: the spare bundle used (REPLACE_ON_SPARE only); the controller removes it from its spares.
        restore_from: the replica to restore (unit actions only).
        replay_since: replay the unit's logged calls of steps >= this (``ReplayLog.calls_for``); equal
            to ``restore_from.step``.
    """

    action: RecoveryAction
    reason: str
    node: str | None = None
    spare: Spare | None = None
    restore_from: Replica | None = None
    replay_since: int | None = None


def decide_recovery(
    fault: Fault,
    *,
    live_nodes: Collection[str],
    replicas_by_unit: Mapping[int, Sequence[Replica | tuple[PoolId, str, int]]],
    spares: Sequence[Spare | tuple[object, str]] = (),
    free_slots: Mapping[str, int] | None = None,
    dead_pools: Collection[PoolId] = (),
    pools_by_node: Mapping[str, int] | None = None,
    log_start: int | None = None,
    last_durable_step: int | None = None,
    durable_uri: str | None = None,
) -> RecoveryDecision:
    """Decide how to recover from ``fault``. See the module docstring for the rules.

    Args:
        fault: the failed unit or pool.
        live_nodes: node ids the cluster reports alive now.
        replicas_by_unit: unit -> the snapshot copies stored for it (acknowledged puts), as
            ``Replica`` or ``(pool, node, step)``. Copies on dead nodes or dead pools are skipped here.
        spares: reserved bundles, in order of preference.
        free_slots: node -> how many more units it can host; None: every live node has room.
        dead_pools: pools known dead (besides those on dead nodes).
        pools_by_node: node -> pools it runs (for placing a new pool); None: all count as 0.
        log_start: the oldest step the replay log can replay for this unit (``ReplayLog.first_step``).
        last_durable_step, durable_uri: the last durable checkpoint, named when recovery fails.
    """
    live = set(live_nodes)
    if fault.kind == "node":
        live.discard(fault.node)  # dead, whatever a stale node list says
    decision = (
        _decide_pool(fault, live, pools_by_node or {})
        if fault.unit is None
        else _decide_unit(
            fault,
            live=live,
            replicas=[
                r if isinstance(r, Replica) else Replica(*r) for r in replicas_by_unit.get(fault.unit, ())
            ],
            spares=[s if isinstance(s, Spare) else Spare(*s) for s in spares],
            free_slots=free_slots,
            dead_pools=set(dead_pools),
            log_start=log_start,
            durable=_durable_note(last_durable_step, durable_uri),
        )
    )
    log = logger.error if decision.action is RecoveryAction.FAIL else logger.warning
    log("Deciding to %s, since %s", decision.action.value, decision.reason)
    return decision


def _decide_unit(
    fault: Fault,
    *,
    live: set[str],
    replicas: list[Replica],
    spares: list[Spare],
    free_slots: Mapping[str, int] | None,
    dead_pools: set[PoolId],
    log_start: int | None,
    durable: str,
) -> RecoveryDecision:
    what = fault.describe()
    if fault.raised:
        return _fail(
            f"{what}. The unit is alive and deterministic: a replacement replaying the same calls would "
            f"raise the same error, so fix its cause. {durable}"
        )
    surviving = [r for r in replicas if r.node in live and r.pool not in dead_pools]
    held = {(r.pool, r.step) for r in surviving}
    whole = [r for r in surviving if all((r.pool, s) in held for s in range(r.start, r.step))]
    usable = [r for r in whole if log_start is None or r.step >= log_start]
    if not usable:
        if whole:
            why = (
                f"its newest surviving snapshot (step {max(r.step for r in whole)}) is older than the "
                f"replay log, which starts at step {log_start}"
            )
        elif surviving:
            why = (
                "no surviving pool holds a whole chain of its snapshots (a full snapshot and every "
                f"gradient record after it; surviving: {_held(surviving)})"
            )
        else:
            why = f"no replica of its snapshot survives (replicas stored: {_held(replicas) or 'none'})"
        return _fail(f"{what}; {why}. Raise TrickleCheckpoint(replicas=...) to survive this. {durable}")
    newest = max(r.step for r in usable)
    replica_nodes = {r.node for r in surviving}

    def rank(node: str) -> tuple[bool, bool]:
        return (node in replica_nodes, node == fault.node)

    live_spares = [s for s in spares if s.node in live]
    if live_spares:
        spare = min(live_spares, key=lambda s: rank(s.node))  # stable: earlier spares win ties
        node, action = spare.node, RecoveryAction.REPLACE_ON_SPARE
        where = f"spare bundle {spare.slot!r} on node {node}"
    else:
        spare = None
        room = {n: 1 for n in live} if free_slots is None else {n: free_slots.get(n, 0) for n in live}
        candidates = [n for n in live if room[n] > 0]
        if not candidates:
            return _fail(
                f"{what}; no spare bundle is left and no live node has room for a replacement (free "
                f"slots: {dict(sorted(room.items()))}). Reserve spares or add nodes. {durable}"
            )
        node = min(candidates, key=lambda n: (*rank(n), -room[n], n))
        action = RecoveryAction.REPLACE_ON_NODE
        where = f"node {node} ({room[node]} free slot(s))"
    source = min((r for r in usable if r.step == newest), key=lambda r: (r.node != node, str(r.pool)))
    shared = " (it holds a replica of this unit: no other place was free)" if node in replica_nodes else ""
    records = (
        f" (the full snapshot of step {source.start} and the gradient records of steps "
        f"{source.start + 1}..{newest})"
        if source.start < newest
        else ""
    )
    reason = (
        f"{what}; restart it on {where}{shared}, restore step {newest}{records} from pool "
        f"{source.pool!r} on node {source.node} (newest of {len(surviving)} surviving replica(s)) and "
        f"replay its logged calls of steps >= {newest}"
    )
    if fault.kind == "deadline":
        reason += "; kill the stalled actor first"
    return RecoveryDecision(
        action=action, reason=reason, node=node, spare=spare, restore_from=source, replay_since=newest
    )


def _held(replicas: Sequence[Replica]) -> str:
    return ", ".join(f"step {r.step} in pool {r.pool!r} on {r.node}" for r in replicas)


def _decide_pool(fault: Fault, live: set[str], pools_by_node: Mapping[str, int]) -> RecoveryDecision:
    what = fault.describe()
    if fault.node in live:
        node = fault.node
        where = f"on its own node {node} (still live; the dead pool's memory is free)"
    elif live:
        node = min(live, key=lambda n: (pools_by_node.get(n, 0), n))
        where = f"on node {node} ({pools_by_node.get(node, 0)} pool(s) there)"
    else:
        return _fail(f"{what}; no live node is left to host a new pool")
    return RecoveryDecision(
        action=RecoveryAction.REPLACE_POOL,
        reason=(
            f"{what}; its replicas are lost, start a new pool {where}; the units it served keep their "
            "other replicas until their next snapshot"
        ),
        node=node,
    )


def _fail(reason: str) -> RecoveryDecision:
    return RecoveryDecision(action=RecoveryAction.FAIL, reason=reason)


def _durable_note(step: int | None, uri: str | None) -> str:
    if step is None:
        if uri is None:
            return (
                "No durable checkpoint is configured (TrickleCheckpoint(durable_uri=None)): the run "
                "must start over."
            )
        return f"No durable checkpoint has been written to {uri} yet: the run must start over."
    where = f" at {uri}" if uri else ""
    resume = f" with `zetta-ray train --resume --checkpoint-dir {uri}`" if uri else ""
    return f"The last durable checkpoint is step {step}{where} and is intact: resume from it{resume}."
