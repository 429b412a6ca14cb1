"""The remote calls the engine sends, and how it waits for them.

A ``Call`` is one call in flight (an ObjectRef and what it was: unit, experts, step, phase, arguments);
a ``Ticket`` is what backward needs to find a forward's calls again. ``wait_for`` is the one place the
engine blocks: it waits on a list of calls within a deadline and turns what Ray reports into a named
fault, ``DeadlineExceeded`` or ``UnitFailed`` (``zetta_ray.errors``), for the first call at fault.

Touches Ray: ``ray.get`` / ``ray.wait`` on the calls' ObjectRefs.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import ray

from zetta_ray.actors.shm import portable
from zetta_ray.errors import DeadlineExceeded, UnitFailed

__all__ = ["PROBE_EVERY_S", "Call", "Ticket", "by_value", "unanswered", "wait_for"]

PROBE_EVERY_S = 2.0  # while a wait lasts, how often the supervisor is asked for units on dead nodes


@dataclass(slots=True)
class Call:
    """One remote call the runtime sent and may still wait for.

    The supervisor (``zetta_ray.control``) gets the calls of a failed wait: for a replaced unit it points
    ``ref`` at the replayed call's result (when ``logged``, the journal's record, was replayed) or asks
    the runtime to ``resend`` it. ``experts``, ``step`` and ``phase`` name the call in faults.
    """

    ref: ray.ObjectRef
    unit: int
    experts: list[tuple[int, int]]
    step: int
    phase: str
    segments: list[tuple[int, int]] = field(default_factory=list)  # row ranges this call carries
    method: str = ""
    args: tuple[Any, ...] = ()
    logged: Any = None  # the journal's record of this call, when it changes the unit's state


@dataclass(frozen=True, slots=True)
class Ticket:
    """What backward needs to find a forward again: its key and which units ran which rows."""

    key: tuple[int, int, int]  # (step, layer, micro-batch)
    calls: list[Call] = field(default_factory=list)
    input_grad: bool = True  # False: backward returns no input gradients


def by_value(args: tuple[Any, ...], timeout_s: float) -> tuple[Any, ...]:
    """``args`` of a call for a replacement unit, carrying their rows themselves: rows in this node's
    shared memory copied out (``portable``), rows in the object store fetched here (this process put
    them, so they are local). Passing the first ObjectRef again would let Ray pull the rows from any
    node that received them, including a node that has died but is not yet declared dead, and such a
    pull waits for the cluster's verdict (about 15 s with Ray's default health checks)."""
    return tuple(ray.get(a, timeout=timeout_s) if isinstance(a, ray.ObjectRef) else a for a in portable(args))


def unanswered(calls: list[Call]) -> list[Call]:
    """The calls of ``calls`` whose result has not arrived, in their order."""
    _, waiting = ray.wait([c.ref for c in calls], num_returns=len(calls), timeout=0)
    waiting_refs = set(waiting)
    return [c for c in calls if c.ref in waiting_refs]


def wait_for(
    calls: list[Call],
    deadline_s: float,
    lost_units: Callable[[list[int]], Iterable[int]] | None = None,
) -> list[Any]:
    """The results of ``calls``, in order, once all have arrived within ``deadline_s``.

    Raises ``DeadlineExceeded`` naming the first late call, or ``UnitFailed`` for a call whose actor
    died or raised. With ``lost_units`` (the supervisor's: which of these units sit on a dead node),
    every ``PROBE_EVERY_S`` of a wait that lasts the units still awaited are checked, and a call to
    one on a dead node is a ``UnitFailed`` at once: Ray fails such a call only once the cluster declares
    the node dead, which its default health checks take about 15 s to do.
    """
    refs = [c.ref for c in calls]
    end = time.monotonic() + deadline_s
    probe = lost_units is not None
    try:
        while True:  # the fast path: one round trip to Ray's core worker
            left = end - time.monotonic()
            try:
                return ray.get(refs, timeout=max(0.0, min(left, PROBE_EVERY_S) if probe else left))
            except ray.exceptions.GetTimeoutError:
                if not probe or time.monotonic() >= end:
                    raise
                _raise_if_node_lost(calls, lost_units)
    except ray.exceptions.GetTimeoutError:
        c = unanswered(calls)[0]
        raise DeadlineExceeded(
            unit=c.unit, experts=c.experts, step=c.step, phase=c.phase, deadline_s=deadline_s
        ) from None
    except ray.exceptions.RayError:
        # Find the call that failed, to name it: answered calls first, since a unit that waits for a
        # dead peer (a pipeline neighbour, a replica's reduction) answers only at its own deadline.
        ready = set(ray.wait(refs, num_returns=len(refs), timeout=0)[0])
        for c in sorted(calls, key=lambda c: c.ref not in ready):
            try:
                ray.get(c.ref, timeout=deadline_s)
            except ray.exceptions.GetTimeoutError:
                raise DeadlineExceeded(
                    unit=c.unit, experts=c.experts, step=c.step, phase=c.phase, deadline_s=deadline_s
                ) from None
            except ray.exceptions.RayError as e:
                cause = getattr(e, "cause", None) or e
                raise UnitFailed(
                    unit=c.unit, experts=c.experts, step=c.step, phase=c.phase, cause=cause
                ) from e
        raise  # unreachable in practice: some call must have failed


def _raise_if_node_lost(calls: list[Call], lost_units: Callable[[list[int]], Iterable[int]]) -> None:
    """``UnitFailed`` for the first unanswered call of a unit that ``lost_units`` finds on a dead node."""
    pending = unanswered(calls)
    lost = set(lost_units(sorted({c.unit for c in pending})))
    for c in pending:
        if c.unit in lost:
            cause = RuntimeError(f"the node of unit {c.unit} is dead: its raylet refuses connections")
            raise UnitFailed(unit=c.unit, experts=c.experts, step=c.step, phase=c.phase, cause=cause)


def read_quietly(refs: list[Any], timeout_s: float) -> list[Any]:
    """Wait up to ``timeout_s`` for ``refs`` (calls a recovery redoes) and read those that ended,
    errors included, so that Ray does not report them as unhandled; returns the ones still running."""
    if not refs:
        return []
    ready, rest = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
    for ref in ready:  # a call that failed with the unit it waited for: its replay is what counts
        with contextlib.suppress(ray.exceptions.RayError):
            ray.get(ref, timeout=0)
    return rest
