"""``Lifetime``: what a module with actors shares about its end; ``GroupModule``: what the modules whose
units form one ``ActorGroup`` (dense replicas, pipeline stages) share. Pure; no Ray (the group calls it).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from zetta_ray.errors import UnsupportedError

__all__ = ["GroupModule", "Lifetime"]


class Lifetime(ABC):
    """A context manager that calls ``close()`` on exit; ``_check_open`` refuses work once closed.
    Subclasses set ``_closed`` in ``__init__`` and say in ``_gone`` what closing released."""

    _closed: bool
    _gone = "its actors are gone"

    @abstractmethod
    def close(self) -> None:
        """Release the module's actors and placement group; safe to call twice."""

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"this {type(self).__name__} is closed; {self._gone}")


class GroupModule(Lifetime):
    """A module whose units are one ``runtime.groups.ActorGroup`` (``group``) in one slice (``_slice``),
    and, for a model with MoE layers, the expert units they share (``experts``: ``SharedExperts``),
    numbered after the group's in ``units``."""

    group: Any
    _slice: Any
    experts: Any = None

    @staticmethod
    def refuse_trickle(checkpoint: Any, units: str, otherwise: str) -> None:
        """Trickle checkpoints of ``units`` are not built: a ``TrickleCheckpoint`` is refused, naming
        what a failure does ``otherwise``; ``None`` and ``False`` pass."""
        if checkpoint not in (None, False):
            raise UnsupportedError(
                f"trickle checkpoints of {units} do not run in this version of zetta_ray; pass "
                f"checkpoint=False or leave it out ({otherwise})"
            )

    def unit_stats(self) -> list[dict[str, Any]]:
        """Asks every unit (one remote call each, within the deadline) its ``ping``: rank or stage,
        process id, node, steps applied, the last step's timings; the shared expert units' after."""
        self._check_open()
        experts = self.experts.runtime.ping() if self.experts is not None else []
        return self.group.wait(self.group.each("ping", "control")) + experts

    def unit_handle(self, index: int) -> Any:
        """The Ray actor of unit ``index`` of ``units`` now (after a recovery: its replacement), for
        fault injection (``zr.chaos``) and diagnostics; a call made on it bypasses the bookkeeping."""
        self._check_open()
        if self.experts is not None and index >= self.group.world:
            return self.experts.runtime.units[index - self.group.world]
        return self.group.actors[index]

    def pool_handles(self) -> dict[str, Any]:
        """No MemoryPool holds these units' state: always empty (``zr.chaos`` asks)."""
        return {}

    @property
    def step(self) -> int:
        """Optimizer steps taken so far."""
        return self.group.step

    @property
    def slice(self) -> Any:
        """The resource slice (``placement.slices.Slice``) the units were placed on."""
        return self._slice

    def close(self) -> None:
        """Kill the units (the shared expert units too) and remove their placement groups. Safe to call
        twice."""
        if not self._closed:
            self._closed = True
            try:
                self.group.close()
            finally:
                self._slice.remove()
                self._close_experts()

    def _close_experts(self) -> None:
        if self.experts is not None:
            self.experts.close()
            self.experts = None
