"""``SharedExperts``: the expert units that data-parallel replicas of an MoE model share.

``zr.parallelize(model, zr.DataParallel(degree=D), zr.ExpertParallel(degree=E))`` puts the dense part of
the model on D replicas (``DataParallelModule``) and every MoE layer's experts on E expert units, placed
as ``zr.ExpertParallel`` alone places them (their own slice). This class is the controller's side of
those units: it starts them (``ExpertRuntime.launch``, the weights go once to the units), gives the
replicas what they need to call them straight (``link``: handles, layout, config; the replicas' rows
never pass through here), and sends what only the controller may send: the optimizer's set-up, the
units' step once every replica's backward is in (on the mean of the replicas' gradients, summed in rank
order on each unit: ``actors/sources.py``), and the reads of their state. With trickle snapshots (the
default), every unit hands its state to MemoryPool actors after each step and a failed one sends every
unit back to that step (``runtime/unit_keeper.py``) while the replicas redo it.
Ray is reached through the slice, the runtime and ``calls.wait_for``; nothing here calls Ray.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from zetta_ray.api.distributed import expert_slice_request, expert_workload, moe_layers
from zetta_ray.api.mesh import ExpertParallel
from zetta_ray.api.units import UnitRecord
from zetta_ray.checkpoint import TrickleCheckpoint
from zetta_ray.config import RuntimeConfig
from zetta_ray.errors import RecoveryFailed
from zetta_ray.placement.plan import PlacerConfig
from zetta_ray.placement.slices import Slice, reserve_slice
from zetta_ray.runtime.calls import Call, wait_for
from zetta_ray.runtime.engine import ExpertRuntime
from zetta_ray.runtime.layout import Layout
from zetta_ray.runtime.unit_keeper import UnitKeeper
from zetta_ray.runtime.unit_pools import start_pools

__all__ = ["ExpertRollback", "SharedExperts"]


@dataclass(frozen=True, slots=True)
class ExpertRollback:
    """A shared expert unit failed and every expert unit went back to a snapshot; the replicas redid
    the step. ``unit`` is its index in ``dmodel.units``."""

    unit: int
    phase: str
    kind: str  # the fault's class name
    snapshot_step: int
    recovery_s: float


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
        trickle: TrickleCheckpoint | None = None,
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
        self.keeper: UnitKeeper | None = None  # the units' snapshots (None: a dead unit is not rebuilt)
        if trickle is not None:
            try:
                nodes = {b.node_id for b in self.slice.units}
                pools = start_pools(
                    nodes, trickle.replicas, trickle.pool_bytes, cfg.start_deadline_s, "expert-pool"
                )
            except BaseException:
                self.close()
                raise
            self.keeper = UnitKeeper(self.runtime, pools)
        for _, layer in layers:
            layer.experts = nn.ModuleList()
        self.pending: list[Call] = []

    def link(self) -> dict[str, Any]:
        """What a replica needs to call the units itself (``attach_experts``'s arguments)."""
        return {"units": list(self.runtime.units), "layout": self.runtime.layout, "cfg": self.cfg}

    def set_optimizer(self, optimizer_cls: type[torch.optim.Optimizer], kwargs: dict[str, Any]) -> None:
        """The units' optimizer; then their first snapshots (a unit that fails from here on is rebuilt)."""
        self.runtime.set_optimizer(optimizer_cls, kwargs)
        if self.keeper is not None:
            self.keeper.snapshot(self.runtime.step)
            self.settle()

    def step(self) -> None:
        """Step every unit on the mean of the replicas' gradients, then snapshot it; call it once every
        replica's backward of the step has answered (their calls to the units are then all in), and
        ``settle`` before the replicas step."""
        self.pending += self.runtime.step_experts(self.replicas)
        if self.keeper is not None:
            self.keeper.snapshot(self.runtime.step)

    def roll_back(self) -> list[Any]:
        """A unit failed: every unit back to the newest kept step (``UnitKeeper.roll_back``); returns the
        units' handles, for the replicas to call. ``RecoveryFailed`` without snapshots."""
        if self.keeper is None:
            raise RecoveryFailed(
                "an expert unit failed and data-parallel expert units run without snapshots here "
                "(checkpoint=False); leave checkpoint out to have a dead one rebuilt"
            )
        self.pending = []
        self.keeper.roll_back(self.cfg.deadline_s)
        return list(self.runtime.units)

    def zero_grad(self) -> None:
        self.runtime.zero_grad()

    def settle(self) -> None:
        """Wait (within the deadline) for the units' steps and snapshots; a dead or stalled unit is a
        ``UnitFault`` (numbered among the expert units)."""
        pending, self.pending = self.pending, []
        wait_for(pending, self.cfg.deadline_s)
        if self.keeper is not None:
            self.keeper.settle(self.cfg.deadline_s)

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
            if self.keeper is not None:
                self.keeper.close()
        finally:
            self.slice.remove()
