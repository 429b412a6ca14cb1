"""ReplicaGroup: the controller's side of a group of data-parallel dense replicas.

It starts ``world`` ``DenseReplicaActor``s (``actors/dense_replica.py``), each with a copy of the model,
tells each the others (their gradient buckets go replica to replica through the object store, never
through this process), and sends them the step's calls: forward on each replica's shard, backward,
optimizer step, zero_grad. Calls return at once as ``Call``s (ObjectRefs); ``wait`` is where this
process blocks, within ``RuntimeConfig.deadline_s``, and a dead or stalled replica becomes a named
``UnitFailed`` / ``DeadlineExceeded`` (``calls.wait_for``).

Every call that changes a replica's training state, or that a replacement must redo, is kept in a
journal (``Entry``: the method, each replica's arguments and ``Call``) from the last moment every replica
was seen done (``settle``) on. When a wait fails, the group's ``supervisor`` (``control.sibling_repair``)
rebuilds the replica from a live sibling and points the dead replica's ``Call``s at the replacement's
results, and the wait goes on: the loop sees nothing.
Touches Ray: actor start (``.remote``), ``ray.put`` of the model, ``ray.kill``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
from torch import nn

from zetta_ray.actors.dense_replica import DenseReplicaActor
from zetta_ray.config import RuntimeConfig
from zetta_ray.errors import RecoveryFailed, UnitFault
from zetta_ray.runtime.calls import Call, read_quietly, wait_for
from zetta_ray.runtime.groups import ActorGroup

__all__ = ["Entry", "ReplicaGroup"]

#: What a journaled call does to a replica's (steps applied, gradient epoch).
EFFECTS = {"step": (1, 0), "zero_grad": (0, 1)}


@dataclass(slots=True)
class Entry:
    """One journaled call: ``method`` sent to every replica, replica ``r`` with ``args[r]``."""

    method: str
    phase: str
    args: list[tuple[Any, ...]]
    calls: list[Call] = field(default_factory=list)


class ReplicaGroup(ActorGroup):
    """``world`` dense replicas of one model. Replica ``r`` is unit ``first_unit + r`` in faults."""

    def __init__(
        self,
        module: nn.Module,
        world: int,
        cfg: RuntimeConfig,
        options: list[dict[str, Any]],
        *,
        seed: int = 0,
        bucket_bytes: int = 25 * 2**20,
        first_unit: int = 0,
        experts: dict[str, Any] | None = None,
    ):
        super().__init__(world, cfg, options, first_unit)
        self.journal: list[Entry] = []  # calls since every replica was last seen done
        self.settled = (0, 0)  # (steps applied, gradient epoch) of every replica at the journal's start
        self.optimizer_args: tuple[Any, Any] | None = None  # (class, kwargs), for a replacement
        self._model = ray.put(module)  # one copy in the object store for every replica (and rebuilds)
        self._init = {
            "seed": seed,
            "threads": cfg.threads_per_unit,
            "bucket_bytes": bucket_bytes,
            "deadline_s": cfg.deadline_s,
            "experts": experts,  # the shared expert units' handles, layout and config, or None
        }
        self.starts = [0] * world  # actors started per rank: a replica's incarnation in expert save keys
        # who repairs a shared expert unit that a replica's call failed on (it raises if it cannot)
        self.experts_failed: Callable[[UnitFault], None] | None = None
        try:
            self.actors = [self._start(r) for r in range(world)]
            self.wait([self.call(r, "connect", "control", self.actors) for r in range(world)], start=True)
        except BaseException:
            self.close()
            raise

    def _start(self, r: int) -> Any:
        incarnation, self.starts[r] = self.starts[r], self.starts[r] + 1
        return DenseReplicaActor.options(**self.options[r]).remote(
            r, self.world, self._model, incarnation=incarnation, **self._init
        )

    def submit(self, method: str, phase: str, args: list[tuple[Any, ...]]) -> list[Call]:
        """Journaled: ``method(*args[r])`` on every replica ``r``; returns at once."""
        entry = Entry(method, phase, args)
        entry.calls = [self.call(r, method, phase, *args[r]) for r in range(self.world)]
        for c in entry.calls:
            c.logged = entry
        self.journal.append(entry)
        return entry.calls

    def forward(self, shards: list[tuple[list[Any], dict[str, Any]]]) -> list[Call]:
        """Replica ``r`` runs forward on ``shards[r]`` (arguments as numpy arrays); returns at once."""
        return self.submit("forward", "forward", [tuple(shard) for shard in shards])

    def settle(self) -> None:
        """Wait for every journaled call; then every replica is at the same state and the journal starts
        again from there."""
        if self.journal:
            self.wait([c for entry in self.journal for c in entry.calls])
            self.settled = self.state_after(len(self.journal))
            self.journal = []

    def state_after(self, n: int) -> tuple[int, int]:
        """(steps applied, gradient epoch) of a replica that has done the journal's first ``n`` calls."""
        steps, epoch = self.settled
        for entry in self.journal[:n]:
            ds, de = EFFECTS.get(entry.method, (0, 0))
            steps, epoch = steps + ds, epoch + de
        return steps, epoch

    def rewind(self, units: list[Any]) -> None:
        """The shared expert units went back to the step's start (one of them was rebuilt): let the
        journal's calls end, rewind every replica (as a new incarnation, calling ``units``), and send
        the journal again; its ``Call``s point at the new results."""
        odd = sorted({e.method for e in self.journal} - {"forward", "backward", "train"})
        if odd:
            raise RecoveryFailed(
                f"the replicas cannot redo the step's calls: the journal holds {odd} since the last wait "
                "(call opt.zero_grad() before the forward, and opt.step() after the backward)"
            )
        read_quietly([c.ref for entry in self.journal for c in entry.calls], self.cfg.deadline_s)
        calls = []
        for r in range(self.world):
            incarnation, self.starts[r] = self.starts[r], self.starts[r] + 1
            calls.append(self.call(r, "rewind", "control", units, incarnation))
        wait_for(calls, self.cfg.deadline_s)
        for entry in self.journal:
            for call in entry.calls:
                self.resend(call)

    def restart(self, r: int) -> Any:
        """Kill replica ``r`` (if it still runs) and start a new one in its place; returns it."""
        ray.kill(self.actors[r], no_restart=True)
        self.actors[r] = self._start(r)
        return self.actors[r]

    def output(self, index: int) -> np.ndarray:
        """Output ``index`` of every replica's last forward, concatenated along dim 0 in rank order."""
        return np.concatenate(self.wait(self.each("output", "forward", index)), axis=0)

    def state_dict(self) -> dict[str, np.ndarray]:
        """The model's state, from replica 0 (every replica holds the same)."""
        return self.wait([self.call(0, "state_dict", "control")])[0]
