"""The replay log: the calls a replacement unit must receive again to catch up, exactly once.

A snapshot at step ``s`` holds a unit's state after ``s`` optimizer steps. Whatever the controller sent
the unit after that (the forwards and backwards of step ``s``, its optimizer step, the forwards of the
step after) is in the unit's memory only. If the unit dies, a replacement restores the snapshot and
receives those calls again, in the order they were first sent. Every call is deterministic given the
unit's state and its arguments, so the replacement ends in the state the dead unit would have reached,
bit for bit, and computes the same outputs for the calls whose results the controller still awaits.

What is logged, per unit and in send order (``LoggedCall.args`` are ``ComputeUnit`` method arguments):

- ``forward(key, experts, counts, x_ND, keep, grad_epoch, ...)``: ``x_ND`` is the array sent, an
  ObjectRef the controller owns (keep the ref: Ray frees an object when its last ref goes), or rows in
  the controller's shared memory (``actors.shm.SharedRows``, which keeps its region alive the same way;
  a replay sends them by value, ``actors.shm.portable``);
- ``backward(key, dy_ND, grad_epoch)``;
- ``step(step, grad_epoch)``: the optimizer step. It is logged too: the controller sends it without
  waiting, so when a unit dies it cannot know whether the step was applied; replaying from the
  snapshot applies it exactly once either way;
- any other call that changes the unit's state (``set_optimizer``, ``load_state_dict``), with
  ``record``. (Or take a snapshot right after it: the step-0 snapshot after ``set_optimizer``.)

Each call is filed under the step in progress when it was sent (``ExpertRuntime.step``, which is also
``key[0]``): a call filed under step ``t`` is replayed onto a snapshot at step ``s`` when ``t >= s``.
``commit(s)`` drops the calls filed under steps before ``s``, once every unit's snapshot at ``s`` is
stored on all its replicas; after that a snapshot older than ``s`` cannot be brought forward, and
``calls_for`` says so instead of replaying a gap.

The log holds at most the calls of the steps since the last commit: with a snapshot after every step,
about one step of expert inputs and output gradients (the same bytes the units received).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from zetta_ray.errors import ReplayUnavailableError

__all__ = ["LoggedCall", "ReplayLog", "ReplayUnavailableError"]

SaveKey = tuple[int, int, int]  # (step, layer, micro-batch)


@dataclass(frozen=True, slots=True)
class LoggedCall:
    """One call as it was sent: replay it with ``getattr(unit, call.method).remote(*call.args)``.

    Attributes:
        method: the ``ComputeUnit`` method: ``"forward"``, ``"backward"``, ``"step"``, or another one
            logged with ``ReplayLog.record``.
        step: the step in progress when the call was sent.
        args: the method's positional arguments, exactly as sent.
    """

    method: str
    step: int
    args: tuple[Any, ...]

    @property
    def key(self) -> SaveKey | None:
        """The (step, layer, micro-batch) of a forward or backward; None for an optimizer step."""
        return self.args[0] if self.method in ("forward", "backward") else None

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays this call holds (ObjectRefs and shared-memory rows count 0: the object
        store and the runtime's shared segments hold those)."""
        return sum(a.nbytes for a in self.args if isinstance(a, np.ndarray))


class ReplayLog:
    """Per-unit logs of the calls sent since the last commit. See the module docstring."""

    def __init__(self) -> None:
        self._calls: dict[int, list[LoggedCall]] = {}
        self._floor_all = 0  # commit(step) for every unit
        self._floor: dict[int, int] = {}  # commit(step, unit=u)

    # -- recording ------------------------------------------------------------------------------------

    def record_forward(
        self,
        unit: int,
        key: SaveKey,
        experts: Sequence[int],
        counts: Sequence[int],
        x_ND: Any,
        keep: bool = True,
        grad_epoch: int = 0,
    ) -> LoggedCall:
        """Log ``unit.forward(key, experts, counts, x_ND, keep, grad_epoch)``; file it under ``key[0]``."""
        args = (tuple(key), list(experts), list(counts), x_ND, keep, grad_epoch)
        return self._record(unit, LoggedCall("forward", key[0], args))

    def record_backward(self, unit: int, key: SaveKey, dy_ND: Any, grad_epoch: int = 0) -> LoggedCall:
        """Log ``unit.backward(key, dy_ND, grad_epoch)``."""
        return self._record(unit, LoggedCall("backward", key[0], (tuple(key), dy_ND, grad_epoch)))

    def record_step(self, unit: int, step: int, grad_epoch: int = 0) -> LoggedCall:
        """Log ``unit.step(step, grad_epoch)``, the optimizer step of step ``step``."""
        return self._record(unit, LoggedCall("step", step, (step, grad_epoch)))

    def record(self, unit: int, method: str, step: int, args: tuple[Any, ...]) -> LoggedCall:
        """Log any other call that changes the unit's state (``set_optimizer``, ``load_state_dict``,
        ``load_optimizer_state_dict``) under the step in progress, so that a replay repeats it too."""
        return self._record(unit, LoggedCall(method, step, tuple(args)))

    def _record(self, unit: int, call: LoggedCall) -> LoggedCall:
        floor = self.first_step(unit)
        if call.step < floor:
            raise ValueError(
                f"unit {unit}: cannot log a {call.method} call of step {call.step}: steps before {floor} "
                "are committed. Commit a step only after the calls of earlier steps were all sent."
            )
        self._calls.setdefault(unit, []).append(call)
        return call

    # -- committing and replaying ------------------------------------------------------------------------

    def commit(self, step: int, unit: int | None = None) -> int:
        """Drop the calls filed under steps before ``step`` (of ``unit``, or of every unit); return how
        many were dropped. Call it once the snapshots at ``step`` are stored on all their replicas."""
        if unit is None:
            self._floor_all = max(self._floor_all, step)
            units = list(self._calls)
        else:
            self._floor[unit] = max(self._floor.get(unit, 0), step)
            units = [unit] if unit in self._calls else []
        dropped = 0
        for u in units:
            kept = [c for c in self._calls[u] if c.step >= step]
            dropped += len(self._calls[u]) - len(kept)
            self._calls[u] = kept
        return dropped

    def calls_for(self, unit: int, since_step: int) -> list[LoggedCall]:
        """The calls to send, in order, to a replacement of ``unit`` restored from a snapshot at
        ``since_step``: every logged call filed under a step ``>= since_step``."""
        floor = self.first_step(unit)
        if since_step < floor:
            raise ReplayUnavailableError(
                f"unit {unit}: a snapshot at step {since_step} cannot be brought forward: the replay log "
                f"starts at step {floor} (earlier steps were committed). Restore a snapshot at step >= "
                f"{floor}, or resume from the last durable checkpoint."
            )
        return [c for c in self._calls.get(unit, []) if c.step >= since_step]

    def first_step(self, unit: int) -> int:
        """The oldest snapshot step the log can bring ``unit`` forward from."""
        return max(self._floor_all, self._floor.get(unit, 0))

    # -- inspection ---------------------------------------------------------------------------------------

    def units(self) -> list[int]:
        return sorted(u for u, calls in self._calls.items() if calls)

    def steps(self, unit: int) -> list[int]:
        """The steps with logged calls for ``unit``, ascending."""
        return sorted({c.step for c in self._calls.get(unit, [])})

    def nbytes(self) -> int:
        """Bytes of arrays held by the log (the replay's memory cost)."""
        return sum(c.nbytes for calls in self._calls.values() for c in calls)

    def __len__(self) -> int:
        return sum(len(calls) for calls in self._calls.values())
