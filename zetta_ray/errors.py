"""The exception hierarchy: every error zetta_ray raises on purpose is a ``ZettaError``, and every one a
user can see is defined here, so ``zr.errors.<Name>`` reaches all of them.

Errors name what was wrong, the values involved, and how to fix it. Faults carry the coordinates a
researcher needs to find them on a large machine: which unit, which experts, which step, which phase.

::

    ZettaError
      ConfigError (ValueError)          a configuration value is invalid
        SpecError, DoesNotFitError      simulator spec files
        ReplicaPlacementError           (also a CheckpointError)
      InfeasibleSliceError (ValueError) a slice the cluster can never hold
      UnsupportedError (ValueError)     well-formed, but not run by this version
      PlacementError                    a placement breaks a rule
        InfeasiblePlacementError (ValueError)
      UnitFault                         a unit did not deliver a result
        DeadlineExceeded (TimeoutError), UnitFailed
      RecoveryFailed                    a unit failed and could not be recovered
      RunAborted                        a pipeline stage stopped its run: a peer failed (replayed)
      ReplayUnavailableError (LookupError)
      DurableCheckpointError            a durable checkpoint could not be assembled
      PoolFullError (MemoryError), SnapshotNotHeldError (LookupError)   MemoryPool answers
      CheckpointError                   snapshot format and durable store
        SnapshotFormatError (ValueError), CorruptCheckpointError, NoValidCheckpointError,
        FlushError, FlushTimeout (TimeoutError)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = [
    "CheckpointError",
    "ConfigError",
    "CorruptCheckpointError",
    "DeadlineExceeded",
    "DoesNotFitError",
    "DurableCheckpointError",
    "FlushError",
    "FlushTimeout",
    "InfeasiblePlacementError",
    "InfeasibleSliceError",
    "NoValidCheckpointError",
    "PlacementError",
    "PoolFullError",
    "RecoveryFailed",
    "ReplayUnavailableError",
    "ReplicaPlacementError",
    "RunAborted",
    "SnapshotFormatError",
    "SnapshotNotHeldError",
    "SpecError",
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

    def _where(self) -> dict[str, Any]:
        return {"unit": self.unit, "experts": self.experts, "step": self.step, "phase": self.phase}


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

    def __reduce__(self) -> tuple[Any, ...]:  # keyword-only arguments: raised in an actor, read here
        return _rebuild, (type(self), {**self._where(), "deadline_s": self.deadline_s})


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

    def __reduce__(self) -> tuple[Any, ...]:
        return _rebuild, (type(self), {**self._where(), "cause": self.cause})


def _rebuild(cls: type[UnitFault], kwargs: dict[str, Any]) -> UnitFault:
    """A unit fault from its keyword arguments (how one crosses a process boundary)."""
    return cls(**kwargs)


class SpecError(ConfigError):
    """A simulator spec file is malformed: an unknown key, a wrong type, or a table in the wrong place."""


class DoesNotFitError(ConfigError):
    """The model, with this mesh, needs more memory per unit than the unit has."""


class PlacementError(ZettaError):
    """A placement breaks one of the placement rules. The message names the rule and the values."""


class InfeasiblePlacementError(PlacementError, ValueError):
    """No placement of this workload on this machine can obey the rules; the message says what is
    missing (memory, units of a kind, pools outside a failure domain) and how to fix it."""


class RecoveryFailed(ZettaError):
    """A unit failed and could not be recovered; the message says why and what is intact."""


class RunAborted(ZettaError):
    """A pipeline stage stopped the run it was in because a peer stage failed; the run is replayed from
    the pipeline's last snapshot once the peer is rebuilt, so a training loop never sees this."""


class ReplayUnavailableError(ZettaError, LookupError):
    """The calls needed to bring a snapshot forward were already committed (dropped)."""


class DurableCheckpointError(ZettaError):
    """A durable checkpoint could not be assembled (its parts were lost); earlier ones are intact."""


class PoolFullError(ZettaError, MemoryError):
    """A snapshot does not fit in a MemoryPool even after evicting its owner's older steps.

    Attributes: ``pool``, ``unit``, ``step``, ``needed`` (bytes of the blob), ``free`` (bytes free after
    the possible evictions) and ``limit`` (the pool's byte limit).
    """

    def __init__(self, message: str, **attrs: Any):
        super().__init__(message)
        for name in ("pool", "unit", "step", "needed", "free", "limit"):
            setattr(self, name, attrs.get(name))


class SnapshotNotHeldError(ZettaError, LookupError):
    """A MemoryPool holds no snapshot under the requested key. The message lists what it holds."""

    def __init__(self, message: str, **attrs: Any):
        super().__init__(message)
        for name in ("pool", "unit", "step", "held"):
            setattr(self, name, attrs.get(name))


class CheckpointError(ZettaError):
    """Base class of every error raised by ``zetta_ray.checkpoint``."""


class SnapshotFormatError(CheckpointError, ValueError):
    """A value cannot be put into a snapshot (unsupported type or dtype), or bytes are not a snapshot."""


class CorruptCheckpointError(CheckpointError):
    """Stored bytes do not match their recorded sha256, size, shape or dtype.

    Attributes:
        kind: what failed: ``"tensor"``, ``"file"``, ``"manifest"`` or ``"header"``.
        name: the tensor name or file name that failed.
        path: the file the bytes came from, when they came from a file (else ``None``).
        expected / actual: the recorded and the observed value (a sha256 hex digest, a size, ...).
        step: the checkpoint or snapshot step, when known.
    """

    def __init__(
        self,
        *,
        kind: str,
        name: str,
        detail: str,
        path: str | None = None,
        expected: object = None,
        actual: object = None,
        step: int | None = None,
    ):
        self.kind = kind
        self.name = name
        self.path = path
        self.expected = expected
        self.actual = actual
        self.step = step
        where = f" in {path}" if path and path != name else ""
        at_step = f" (step {step})" if step is not None else ""
        super().__init__(f"{kind} {name!r}{where}{at_step} is corrupt: {detail}")


class NoValidCheckpointError(CheckpointError):
    """Complete checkpoints exist, but every one of them failed verification.

    ``failures`` holds one ``CorruptCheckpointError`` per checkpoint, newest first. Starting from scratch
    silently would throw away the run, so this is an error; restore a good copy of one of the named
    files, or delete the store's checkpoints to start over on purpose.
    """

    def __init__(self, *, uri: str, failures: Sequence[CorruptCheckpointError]):
        self.uri = uri
        self.failures = list(failures)
        lines = "\n".join(f"  - {f}" for f in self.failures)
        super().__init__(
            f"every complete checkpoint under {uri!r} failed verification:\n{lines}\n"
            "Restore a good copy of a named file, or remove the checkpoints to start the run over."
        )


class FlushError(CheckpointError):
    """One or more background jobs failed. ``failures`` holds ``(label, exception)`` pairs, oldest first;
    the first exception is also the ``__cause__``. The flusher keeps running: later jobs still execute,
    so a durable checkpoint that failed is simply absent (readers fall back to the previous one)."""

    def __init__(self, *, name: str, failures: Sequence[tuple[str, BaseException]]):
        self.failures = list(failures)
        self.errors = [e for _, e in self.failures]
        label, first = self.failures[0]
        more = f" (and {len(self.failures) - 1} more)" if len(self.failures) > 1 else ""
        super().__init__(
            f"background job {label!r} in {name!r} failed: {type(first).__name__}: {first}{more}"
        )


class FlushTimeout(CheckpointError, TimeoutError):
    """A wait on the background flusher passed its deadline (queue full, or flush not done in time)."""


class ReplicaPlacementError(CheckpointError, ConfigError):
    """There are fewer nodes than the requested snapshot replicas need (with ``strict=True``)."""
