"""ReplicaGroup: the controller's side of a group of data-parallel dense replicas.

It starts ``world`` ``DenseReplicaActor``s (``actors/dense_replica.py``), each with a copy of the model,
tells each the others (their gradient buckets go replica to replica through the object store, never
through this process), and sends them the step's calls: forward on each replica's shard, backward,
optimizer step, zero_grad. Calls return at once as ``Call``s (ObjectRefs); ``wait`` is where this
process blocks, within ``RuntimeConfig.deadline_s``, and a dead or stalled replica becomes a named
``UnitFailed`` / ``DeadlineExceeded`` (``calls.wait_for``).

A dead replica is rebuilt from a live sibling (``rebuild``): siblings hold bitwise the same parameters and
optimizer state after every step, so the replacement copies one of them and no checkpoint is read.
Touches Ray: actor start (``.remote``), ``ray.put`` of the model, ``ray.kill``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import ray
from torch import nn

from zetta_ray.actors.dense_replica import DenseReplicaActor
from zetta_ray.config import RuntimeConfig
from zetta_ray.runtime.calls import Call, wait_for

__all__ = ["ReplicaGroup"]


class ReplicaGroup:
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
    ):
        self.world = world
        self.cfg = cfg
        self.options = list(options)
        self.first_unit = first_unit
        self.step = 0  # optimizer steps submitted
        self._model = ray.put(module)  # one copy in the object store for every replica (and rebuilds)
        self._init = {
            "seed": seed,
            "threads": cfg.threads_per_unit,
            "bucket_bytes": bucket_bytes,
            "deadline_s": cfg.deadline_s,
        }
        self.actors: list[Any] = []
        try:
            self.actors = [self._start(r) for r in range(world)]
            self.wait([self.call(r, "connect", "control", self.actors) for r in range(world)], start=True)
        except BaseException:
            self.close()
            raise

    def _start(self, r: int) -> Any:
        return DenseReplicaActor.options(**self.options[r]).remote(r, self.world, self._model, **self._init)

    def call(self, r: int, method: str, phase: str, *args: Any) -> Call:
        """``method(*args)`` on replica ``r``; returns at once."""
        ref = getattr(self.actors[r], method).remote(*args)
        return Call(ref=ref, unit=self.first_unit + r, experts=[], step=self.step, phase=phase, method=method)

    def each(self, method: str, phase: str, *args: Any) -> list[Call]:
        """``method(*args)`` on every replica, in rank order; returns at once."""
        return [self.call(r, method, phase, *args) for r in range(self.world)]

    def forward(self, shards: list[tuple[list[Any], dict[str, Any]]]) -> list[Call]:
        """Replica ``r`` runs forward on ``shards[r]`` (arguments as numpy arrays); returns at once."""
        return [self.call(r, "forward", "forward", *shards[r]) for r in range(self.world)]

    def wait(self, calls: list[Call], start: bool = False) -> list[Any]:
        """The calls' results, within the deadline (``start``: the start-up deadline)."""
        return wait_for(calls, self.cfg.start_deadline_s if start else self.cfg.deadline_s)

    def output(self, index: int) -> np.ndarray:
        """Output ``index`` of every replica's last forward, concatenated along dim 0 in rank order."""
        return np.concatenate(self.wait(self.each("output", "forward", index)), axis=0)

    def state_dict(self) -> dict[str, np.ndarray]:
        """The model's state, from replica 0 (every replica holds the same)."""
        return self.wait([self.call(0, "state_dict", "control")])[0]

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
