"""StageGroup: the controller's side of a pipeline's stages.

It starts one ``PipelineStageActor`` per stage (``actors/pipeline_stage.py``), each with its contiguous
run of the model's layers, tells each its neighbours (activations and gradients go stage to stage,
never through this process), and sends a step's calls: the micro-batches to the first stage and their
targets to the last (straight into their inboxes), then one ``run`` per stage on its schedule; commit,
optimizer step and zero_grad after it. Calls return at once (``ActorGroup``); a dead or stalled stage
is a named ``UnitFailed`` / ``DeadlineExceeded`` at the next wait (no supervisor yet: a stage is not
rebuilt).
Touches Ray: actor start (``.remote``), ``ray.put`` of each stage's layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import ray
from torch import nn

from zetta_ray.actors.pipeline_stage import PipelineStageActor, schedule
from zetta_ray.config import RuntimeConfig
from zetta_ray.runtime.calls import Call
from zetta_ray.runtime.groups import ActorGroup

__all__ = ["StageGroup"]


class StageGroup(ActorGroup):
    """The stages of one pipeline; stage ``s`` holds ``layers[s]`` and is unit ``s`` in faults."""

    def __init__(
        self,
        layers: Sequence[Sequence[nn.Module]],
        cfg: RuntimeConfig,
        options: list[dict[str, Any]],
        *,
        microbatches: int,
        kind: str = "1f1b",
        seed: int = 0,
    ):
        super().__init__(len(layers), cfg, options)
        self.microbatches = microbatches
        self.schedules = [schedule(kind, self.world, s, microbatches) for s in range(self.world)]
        init = {"seed": seed, "threads": cfg.threads_per_unit, "deadline_s": cfg.deadline_s}
        try:
            for s, run in enumerate(layers):
                actor = PipelineStageActor.options(**self.options[s]).remote(
                    s, self.world, ray.put(list(run)), **init
                )
                self.actors.append(actor)
            self.wait(self.each("connect", "control", self.actors), start=True)
        except BaseException:
            self.close()
            raise

    def run(self, run: int, parts: list[tuple[list[Any], dict[str, Any]]], backward: bool) -> list[Call]:
        """Run ``run`` over the micro-batches ``parts`` (each ``([x, y], {})``): inputs to the first
        stage, targets to the last, then every stage's schedule. Returns the ``run`` calls by stage."""
        first, last = self.actors[0], self.actors[-1]
        for m, (args, kwargs) in enumerate(parts):
            if kwargs or len(args) != 2:
                raise TypeError(
                    "a pipelined model is called as dmodel(x, y): the first layer takes x, the last "
                    f"layer takes the last stage's activations and y; got {len(args)} positional "
                    f"arguments and keywords {sorted(kwargs)}"
                )
            first.deliver.remote("act", run, m, args[0])
            last.deliver.remote("target", run, m, args[1])
        return [
            self.call(s, "run", "forward", run, self.schedules[s], self.microbatches, backward)
            for s in range(self.world)
        ]

    def output(self, index: int) -> np.ndarray:
        """Output ``index`` of the last run (the last stage's, micro-batches concatenated)."""
        return self.wait([self.call(self.world - 1, "output", "forward", index)])[0]
