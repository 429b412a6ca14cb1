"""The exception hierarchy. Every error zetta_ray raises on purpose is a ``ZettaError``.

Errors name what was wrong, the values involved, and how to fix it. Faults carry the coordinates a
researcher needs to find them on a large machine: which unit, which experts, which step, which phase.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "ConfigError",
    "DeadlineExceeded",
    "InfeasibleSliceError",
    "UnitFailed",
    "UnitFault",
    "UnsupportedError",
    "ZettaError",
]


class ZettaError(Exception):
    """Base class of every error zetta_ray raises on purpose."""


class ConfigError(ZettaError, ValueError):
    """A configuration value is invalid. The message names the field, the value and the fix."""


class InfeasibleSliceError(ZettaError, ValueError):
    """A slice (a job's share of the cluster) that the cluster cannot hold.

    Raised before any placement group is left pending: the message lists what is missing and the largest
    request that would fit.
    """


class UnsupportedError(ZettaError, ValueError):
    """A request that is well-formed but outside what this version of zetta_ray runs."""


def _fmt_experts(experts: Sequence[tuple[int, int]]) -> str:
    shown = ", ".join(f"L{layer}/E{expert}" for layer, expert in experts[:8])
    more = f" (+{len(experts) - 8} more)" if len(experts) > 8 else ""
    return f"[{shown}{more}]"


class UnitFault(ZettaError):
    """A remote compute unit did not deliver a result. Subclasses say why.

    Attributes:
        unit: index of the ComputeUnit actor.
        experts: (layer, expert) pairs hosted on that unit that the call concerned.
        step: optimizer step the call belonged to.
        phase: "dispatch", "forward", "backward", "optimizer", "snapshot" or "control".
    """

    def __init__(self, *, unit: int, experts: Sequence[tuple[int, int]], step: int, phase: str, detail: str):
        self.unit = unit
        self.experts = list(experts)
        self.step = step
        self.phase = phase
        super().__init__(
            f"unit {unit} (experts {_fmt_experts(self.experts)}) at step {step}, phase {phase!r}: {detail}"
        )


class DeadlineExceeded(UnitFault, TimeoutError):
    """A remote call ran past its deadline.

    Raise ``RuntimeConfig.deadline_s`` if calls are legitimately slow.
    """

    def __init__(
        self, *, unit: int, experts: Sequence[tuple[int, int]], step: int, phase: str, deadline_s: float
    ):
        self.deadline_s = deadline_s
        super().__init__(
            unit=unit,
            experts=experts,
            step=step,
            phase=phase,
            detail=(
                f"no result within the {deadline_s:g} s deadline. If the unit is alive but slow, raise "
                "RuntimeConfig(deadline_s=...) above the step time; otherwise the unit is stalled."
            ),
        )


class UnitFailed(UnitFault):
    """The actor hosting a unit died or raised while running a call."""

    def __init__(
        self, *, unit: int, experts: Sequence[tuple[int, int]], step: int, phase: str, cause: BaseException
    ):
        self.cause = cause
        first_line = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        super().__init__(
            unit=unit, experts=experts, step=step, phase=phase, detail=f"{type(cause).__name__}: {first_line}"
        )
