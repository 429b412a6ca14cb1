"""``SharedExperts``: the expert units that data-parallel replicas of an MoE model share.

``zr.parallelize(model, zr.DataParallel(degree=D), zr.ExpertParallel(degree=E))`` puts the dense part of
the model on D replicas (``DataParallelModule``) and every MoE layer's experts on E expert units, placed
as ``zr.ExpertParallel`` alone places them (their own slice). This class is the controller's side of
those units: it starts them (``ExpertRuntime.launch``, the weights go once to the units), gives the
replicas what they need to call them straight (``link``: handles, layout, config; the replicas' rows
never pass through here), and sends what only the controller may send: the optimizer's set-up, the
units' step once every replica's backward is in (on the mean of the replicas' gradients, summed in rank
order on each unit: ``actors/sources.py``), and the reads of their state.
Ray is reached through the slice, the runtime and ``calls.wait_for``; nothing here calls Ray.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from torch import nn

from zetta_ray.api.distributed import expert_slice_request, expert_workload, moe_layers
from zetta_ray.api.mesh import ExpertParallel
from zetta_ray.api.units import UnitRecord
from zetta_ray.config import RuntimeConfig
from zetta_ray.errors import RecoveryFailed, UnitFault
from zetta_ray.placement.plan import PlacerConfig
from zetta_ray.placement.slices import Slice, reserve_slice
from zetta_ray.runtime.calls import Call, wait_for
from zetta_ray.runtime.engine import ExpertRuntime
from zetta_ray.runtime.layout import Layout

__all__ = ["SharedExperts"]


class SharedExperts:
    """The expert units of ``module``'s MoE layers, shared by ``replicas`` data-parallel replicas (the
    mesh's ``dense_units`` dense units, in a slice of their own, share the cluster with them). The
    module's MoE layers are emptied here (their experts live on the units); a replica re-points them
    at the units (``runtime/expert_client.py``)."""

    def __init__(
        self,
        module: nn.Module,
        strategy: ExpertParallel,
        replicas: int,
        cfg: RuntimeConfig,
        placer: PlacerConfig | None = None,
        dense_units: int = 0,
    ):
        layers = moe_layers(module, strategy)
        self.replicas = replicas
        self.prefix = {i: f"{name}.experts." for i, (name, _) in enumerate(layers)}
        request = expert_slice_request(None, strategy, cfg)
        request = dataclasses.replace(request, mesh_units=request.units + dense_units)
        self.slice: Slice = reserve_slice(request, expert_workload([layer for _, layer in layers]), placer)
        try:
            layout = Layout(request.units, self.slice.plan.unit_LE)
            options = [self.slice.actor_options(b) for b in self.slice.units]
            self.cfg = dataclasses.replace(cfg, shared_memory=False)  # no rows pass through this process
            experts = [list(layer.experts) for _, layer in layers]
            self.runtime = ExpertRuntime.launch(experts, layout, self.cfg, options)
        except BaseException:
            self.slice.remove()
            raise
        for _, layer in layers:
            layer.experts = nn.ModuleList()
        self.pending: list[Call] = []

    def link(self) -> dict[str, Any]:
        """What a replica needs to call the units itself (``attach_experts``'s arguments)."""
        return {"units": list(self.runtime.units), "layout": self.runtime.layout, "cfg": self.cfg}

    def set_optimizer(self, optimizer_cls: type[torch.optim.Optimizer], kwargs: dict[str, Any]) -> None:
        self.runtime.set_optimizer(optimizer_cls, kwargs)

    def step(self) -> None:
        """Step every unit on the mean of the replicas' gradients; call it once every replica's
        backward of the step has answered (their calls to the units are then all in)."""
        self.pending += self.runtime.step_experts(self.replicas)

    def zero_grad(self) -> None:
        self.runtime.zero_grad()

    def settle(self) -> None:
        """Wait (within the deadline) for the units' steps; a dead or stalled unit is ``RecoveryFailed``."""
        pending, self.pending = self.pending, []
        try:
            wait_for(pending, self.cfg.deadline_s)
        except UnitFault as fault:
            raise self.unrecovered(fault) from fault

    def unrecovered(self, fault: UnitFault) -> RecoveryFailed:
        """The error for expert unit ``fault.unit`` (numbered among the units, not ``dmodel.units``)."""
        return RecoveryFailed(
            f"expert unit {self.replicas + fault.unit} of dmodel.units failed ({fault}); expert units "
            "shared by data-parallel replicas are not rebuilt in this version of zetta_ray (their calls "
            "come from the replicas, which the fault manager does not journal). Use zr.ExpertParallel "
            "alone for recoverable expert units"
        )

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The experts' tensors under the wrapped module's keys."""
        out = {}
        for name, value in self.runtime.state_dict().items():
            layer, rest = name.split(".", 1)
            out[self.prefix[int(layer)] + rest] = torch.from_numpy(np.array(value))
        return out

    def units(self, first: int) -> list[UnitRecord]:
        """The units' records, numbered from ``first`` (after the replicas)."""
        layout = self.runtime.layout
        return [
            UnitRecord(index=first + u, role="expert", node_id=b.node_id, experts=tuple(layout.experts_of(u)))
            for u, b in enumerate(self.slice.units)
        ]

    def close(self) -> None:
        try:
            self.runtime.close()
        finally:
            self.slice.remove()
