"""Durable checkpoints of the running job, staged and finished from the trickle snapshots.

``control/durable.py`` (``DurableCheckpointer``) schedules durable checkpoints and writes them on its
flusher thread; this module ties it to the snapshot rounds: ``stage`` keeps the dense part of the current
step and makes sure every unit has a *full* snapshot of that step on its way (a checkpoint holds full
states only), ``commits.Commits.write_durable`` writes it once those are stored, ``finish`` waits for
every staged checkpoint, and ``restarted_at`` counts the schedule from a resumed step.

No Ray here: it waits through ``Commits`` (which reads results through the ``Cluster`` seam).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from zetta_ray.control.commits import Commits
from zetta_ray.control.durable import DurableCheckpointer
from zetta_ray.control.seams import Runtime
from zetta_ray.control.snapshots import Snapshots
from zetta_ray.errors import RecoveryFailed, ZettaError

__all__ = ["DurableWrites"]

logger = logging.getLogger("zetta_ray.control.manager")  # the fault manager's log: one name for its parts


class DurableWrites:
    """Stages and finishes one job's durable checkpoints (``durable`` None: the job makes none, and
    ``stage`` and ``finish`` must not be called)."""

    def __init__(
        self,
        durable: DurableCheckpointer | None,
        *,
        deadline_s: float,
        commits: Commits,
        snapshots: Snapshots,
    ):
        self.durable = durable
        self.deadline_s = deadline_s
        self.commits = commits
        self.snapshots = snapshots

    def stage(self, runtime: Runtime, dense: Any) -> None:
        """Write a durable checkpoint of the current step with ``dense`` (the controller's part) once the
        units' snapshots of this step are stored (snapshotting now if this step has none)."""
        step = runtime.step
        self.durable.stage(step, dense)
        chains = self.snapshots.chains
        if not all(u in chains and chains[u].base == step for u in range(len(runtime.units))):
            self.snapshots.take(runtime, full=True)  # none this step, or records: it needs full state
        elif step <= self.commits.committed_step:  # its snapshots landed already
            self.commits.write_durable(step)

    def finish(self) -> None:
        """Wait until every staged durable checkpoint is written; raise if one could not be."""
        deadline = time.monotonic() + self.deadline_s
        while self.durable.staged and self.commits.puts and time.monotonic() < deadline:
            self.commits.collect(wait_s=0.05)
        if self.durable.staged:
            steps = [s.step for s in self.durable.staged]
            raise RecoveryFailed(
                f"the snapshots of step(s) {steps} were not stored within {self.deadline_s:g} s, so their "
                "durable checkpoints could not be written; check the MemoryPool actors"
            )
        self.durable.flush()

    def restarted_at(self, runtime: Runtime) -> None:
        """The units were restored to ``runtime.step`` from a durable checkpoint: snapshot that state
        (recovery restores from it) and count the durable schedule from there."""
        self.snapshots.take(runtime, wait=True)
        if self.durable is not None:
            self.durable.restart_at(runtime.step)

    def close(self) -> None:
        """Finish the staged checkpoints (they need the pools, so before those go) and stop the flusher;
        errors are logged, not raised: the job is closing."""
        if self.durable is None:
            return
        try:
            self.finish()
        except ZettaError as e:
            logger.error("closing with durable checkpoints unwritten: %s", e)
        try:
            self.durable.close()
        except ZettaError as e:
            logger.error("a durable checkpoint write failed: %s", e)
