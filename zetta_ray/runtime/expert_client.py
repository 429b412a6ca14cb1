"""ExpertClient: a data-parallel replica's own driver of the expert units it shares with its siblings.

With ``zr.DataParallel`` and ``zr.ExpertParallel`` together, the controller starts the expert units
(``ExpertRuntime.launch``) and every dense replica (``actors/dense_replica.py``) gets their handles.
``attach_experts`` builds an ``ExpertClient`` in the replica's process and installs ``RemoteExperts``
in each of the replica's MoE layers, so that the replica's rows go straight to the expert units, unit
to unit, never through the controller. Each save key carries the replica's ``(rank, incarnation)``
(``ExpertRuntime.source``), so the units keep every replica's gradients apart (``actors/sources.py``).

The controller sends the units' optimizer step (after every replica's backward), so a client only
counts steps (``count_step``) to key its calls as the units expect; a replacement replica takes its
sibling's counts (``sync``). Rows go through the object store (no shared memory with the units).
Touches Ray: through ``ExpertRuntime`` (the calls to the units).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from zetta_ray.config import RuntimeConfig
from zetta_ray.experts.moe import MoELayer
from zetta_ray.runtime.bridge import RemoteExperts
from zetta_ray.runtime.engine import ExpertRuntime
from zetta_ray.runtime.layout import Layout

__all__ = ["ExpertClient", "attach_experts"]


class ExpertClient(ExpertRuntime):
    """An ``ExpertRuntime`` over units someone else started and steps; see the module docstring."""

    def count_step(self) -> None:
        """The controller stepped the units: later calls belong to the next step."""
        self.step += 1
        self._micro_batch.clear()

    def sync(self, step: int, grad_epoch: int) -> None:
        """Count on from ``step`` optimizer steps and ``grad_epoch`` zero_grads (a sibling's)."""
        self.step, self._grad_epoch = step, grad_epoch
        self._micro_batch.clear()


def attach_experts(
    module: nn.Module,
    *,
    units: list[Any],
    layout: Layout,
    cfg: RuntimeConfig,
    source: tuple[int, int],
    first_layer: int = 0,
) -> ExpertClient:
    """Point every ``MoELayer`` of ``module`` (in module order, as ``zr.parallelize`` numbered them,
    from ``first_layer`` on: a pipeline stage holds a run of them) at the expert units ``units``;
    returns the client that drives them for this unit."""
    client = ExpertClient(list(units), layout, dataclasses.replace(cfg, shared_memory=False))
    client.source = source
    layers = [m for m in module.modules() if isinstance(m, MoELayer)]
    if first_layer + len(layers) > len(layout.unit_LE):
        raise ValueError(
            f"MoE layers {first_layer}..{first_layer + len(layers) - 1} asked for; the expert units "
            f"host {len(layout.unit_LE)}"
        )
    for i, layer in enumerate(layers, start=first_layer):
        layer.experts = nn.ModuleList()
        layer.executor = RemoteExperts(client, i)
    return client
