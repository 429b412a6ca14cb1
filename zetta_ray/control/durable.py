"""Durable checkpoints of a running job, made from the trickle snapshots (``TrickleCheckpoint.durable_*``).

A durable checkpoint of step ``s`` is one ``checkpoint.DurableStore`` directory with a part per compute
unit (``unit-0000`` ...: that unit's step-``s`` snapshot, fetched from a MemoryPool that holds it) and a
``dense`` part (the controller's dense parameters, its optimizer state and RNG state, the data loader's
position and the mesh, copied right after the dense optimizer step of ``s``). It is consistent because
every part is the state after the same step, and it costs the training loop only the dense part's
copy: the unit parts are already in the pools, and fetching, encoding (safetensors + sha256) and
writing happen on the ``AsyncFlusher``'s thread.

The schedule is ``checkpoint.policy.decide``: every ``durable_every`` steps and/or every
``durable_interval_s`` seconds, at snapshot steps only. ``FaultManager`` calls ``due`` after the dense
step, ``stage`` with the dense part, and ``commit`` when the units' snapshots of that step are stored.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import ray

from zetta_ray.checkpoint import AsyncFlusher, CheckpointInfo, DurableStore, Snapshot, TrickleCheckpoint
from zetta_ray.checkpoint.policy import TrickleState, decide
from zetta_ray.errors import DurableCheckpointError

__all__ = ["DENSE_PART", "DurableCheckpointError", "DurableCheckpointer", "unit_part"]

logger = logging.getLogger(__name__)

DENSE_PART = "dense"


def unit_part(u: int) -> str:
    """The part name of compute unit ``u`` in a durable checkpoint."""
    return f"unit-{u:04d}"


@dataclass(slots=True)
class _Staged:
    step: int
    dense: Snapshot
    before: TrickleState  # the schedule's state before this checkpoint was staged


class DurableCheckpointer:
    """Schedules and writes durable checkpoints for one job. See the module docstring."""

    def __init__(self, config: TrickleCheckpoint, *, deadline_s: float, start_step: int = 0):
        if config.durable_uri is None:
            raise ValueError("DurableCheckpointer needs TrickleCheckpoint.durable_uri")
        self.config = config
        self.deadline_s = deadline_s
        self.store = DurableStore(config.durable_uri, keep_last=config.keep_last)
        self.flusher = AsyncFlusher(max_pending=1, name="zetta-ray-durable")
        self.state = TrickleState.start(start_step, time.monotonic())
        self.staged: list[_Staged] = []
        self.written: list[int] = []  # steps handed to the flusher, in order

    def restart_at(self, step: int) -> None:
        """The job continues from ``step`` (it was resumed): count the schedule from there."""
        self.state = TrickleState.start(step, time.monotonic())
        self.staged.clear()

    def due(self, step: int, *, force: bool = False) -> bool:
        """Whether completed step ``step`` gets a durable checkpoint (``force``: yes, unless it has one)."""
        if step < 1 or step <= self.state.last_durable_step:
            return False
        if force:
            return True
        busy = self.flusher.pending > 0
        return decide(step, time.monotonic(), self.config, self.state, busy=busy).durable

    def stage(self, step: int, dense: Snapshot) -> None:
        """Keep the dense part of step ``step`` until the units' snapshots of that step are stored."""
        self.staged.append(_Staged(step, dense, self.state))
        self.state = self.state.after_durable(step, time.monotonic())

    def wants(self, step: int) -> bool:
        """Whether a checkpoint of ``step`` is staged and waits for the units' snapshots."""
        return any(s.step == step for s in self.staged)

    def abandon(self, step: int) -> None:
        """The snapshots of ``step`` will never all be stored (a put failed or timed out): give up its
        staged checkpoint, with a warning, and let the schedule pick the next one as if it had not been
        staged."""
        match = [s for s in self.staged if s.step == step]
        if not match:
            return
        self.staged = [s for s in self.staged if s.step != step]
        if self.state.last_durable_step == step:
            self.state = match[0].before
        logger.warning(
            "durable checkpoint of step %d skipped: a snapshot of that step could not be stored (see the "
            "warnings before); the next durable checkpoint is made at the next step the schedule names",
            step,
        )

    def commit(self, step: int, fetch: dict[int, list[ray.ObjectRef]]) -> None:
        """The units' snapshots of ``step`` are stored: write the checkpoint staged for ``step``.

        ``fetch`` maps each unit to refs of its step-``step`` snapshot, one per replica (``MemoryPool.get``
        calls already sent, so that a pool's later ``drop_before`` cannot overtake them); the first that
        arrives is written. Staged checkpoints of older steps, whose snapshots never all landed, are
        dropped with a warning (their step's state exists nowhere complete any more).
        """
        for old in [s for s in self.staged if s.step < step]:
            logger.warning(
                "durable checkpoint of step %d skipped: the snapshots of that step were not all stored "
                "before those of step %d",
                old.step,
                step,
            )
        match = [s for s in self.staged if s.step == step]
        self.staged = [s for s in self.staged if s.step > step]
        if not match:
            return
        dense, deadline = match[0].dense, self.deadline_s
        meta = {"data_position": dense.data_position, "mesh": dense.mesh}

        def write() -> CheckpointInfo:
            parts: dict[str, Snapshot] = {DENSE_PART: dense}
            for u, refs in sorted(fetch.items()):
                parts[unit_part(u)] = _first_ok(refs, deadline, what=f"unit {u}'s snapshot of step {step}")
            return self.store.write(step, parts, meta=meta)

        self.written.append(step)
        self.flusher.submit(write, label=f"durable checkpoint of step {step}", timeout=self.deadline_s)

    def flush(self) -> None:
        """Wait until every submitted checkpoint is written; raise ``FlushError`` if one failed."""
        self.flusher.flush(timeout=self.deadline_s)

    def close(self) -> None:
        self.flusher.close(timeout=self.deadline_s)


def _first_ok(refs: list[ray.ObjectRef], deadline_s: float, *, what: str) -> Snapshot:
    errors = []
    for ref in refs:
        try:
            return ray.get(ref, timeout=deadline_s)
        except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError) as e:
            errors.append(str(e).splitlines()[0])
    raise DurableCheckpointError(
        f"no replica of {what} could be read for the durable checkpoint ({len(refs)} tried: {errors}); "
        "the MemoryPools that held it died. The next durable checkpoint is made from newer snapshots."
    )
