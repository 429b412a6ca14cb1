"""Errors of the checkpoint package. All are ``ZettaError`` subclasses.

They carry the coordinates a recovery path needs as attributes (which tensor or file, which step, the
expected and the actual value), and their messages say how to fix or work around the problem.
"""

from __future__ import annotations

from collections.abc import Sequence

from zetta_ray.errors import ConfigError, ZettaError

__all__ = [
    "CheckpointError",
    "CorruptCheckpointError",
    "FlushError",
    "FlushTimeout",
    "NoValidCheckpointError",
    "ReplicaPlacementError",
    "SnapshotFormatError",
]


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
