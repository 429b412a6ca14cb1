"""``DataParallelModule``: a dense model trained by data-parallel replicas on ComputeUnit actors.

``zr.parallelize(model, zr.DataParallel(degree=D))`` builds one for a dense model; with
``zr.ExpertParallel(degree=E)`` too, for a model with MoE layers, whose experts then live on E expert
units that every replica calls directly (``api/expert_units.py``). This
process does no model compute: a call splits the batch (dim 0 of every tensor argument) into ``D`` equal
shards and submits one forward per replica; ``loss.backward()`` and ``opt.step()`` submit the replicas'
backward and optimizer step and return at once. The replicas reduce their gradients among themselves
(``actors/dense_replica.py``: buckets sent during backward, the mean in replica order), so no gradient
byte passes through here; what comes back is one float per replica per step (the shard losses), and
the logits only when the caller reads them (``RemoteOutput.fetch``).

The step's loss is the mean of the shard losses. With equal shards that is the loss of the whole batch
for a model whose loss is a mean over the batch, and the update equals one process that accumulates
``(loss_i / D).backward()`` over the shards and steps once (tests/ray/test_data_parallel.py).

Ray is reached through ``api.cluster.init``, the slice (``placement.slices``) and the replica group
(``runtime.replicas``); nothing here calls Ray itself.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from zetta_ray.actors.wire import tree_from_wire
from zetta_ray.api.cluster import init
from zetta_ray.api.expert_units import ExpertRollback, SharedExperts
from zetta_ray.api.lifetime import GroupModule
from zetta_ray.api.mesh import DataParallel, ExpertParallel
from zetta_ray.api.remote import RemoteLoss, RemoteOutput, split_batch
from zetta_ray.api.units import UnitRecord
from zetta_ray.checkpoint import TrickleCheckpoint
from zetta_ray.config import RuntimeConfig
from zetta_ray.control.sibling_repair import ReplicaRecovery, SiblingRepair
from zetta_ray.errors import ConfigError, UnitFault, UnsupportedError
from zetta_ray.placement.plan import PlacerConfig
from zetta_ray.placement.slice_plan import SliceRequest
from zetta_ray.placement.slices import Slice, reserve_replica_slice
from zetta_ray.runtime.calls import Call
from zetta_ray.runtime.replicas import ReplicaGroup

__all__ = ["DataParallelModule", "ReplicatedOptimizer"]


class DataParallelModule(GroupModule):
    """``degree`` replicas of a dense model on compute units; see the module docstring.

    Use it as the plain module in the training loop::

        logits, loss = dmodel(x, y)     # or loss = dmodel(x, y) for a model that returns its loss
        loss.backward()
        opt.step(); opt.zero_grad()     # opt = dmodel.optimizer(torch.optim.AdamW, lr=...)
        loss.item()                     # the mean of the shard losses

    ``state_dict()`` has the wrapped module's keys. The module is modified in place: its parameters
    move to the meta device here (the replicas hold them). Close it (or use it as a context manager)
    to release its actors.
    """

    _gone = "its replicas are gone"

    def __init__(
        self,
        module: nn.Module,
        strategy: DataParallel,
        runtime: RuntimeConfig | None = None,
        slice: SliceRequest | None = None,
        placer: PlacerConfig | None = None,
        checkpoint: TrickleCheckpoint | Literal[False] | None = None,
        experts: ExpertParallel | None = None,
    ):
        if experts is None:
            self.refuse_trickle(
                checkpoint, "data-parallel replicas", "a dead replica is rebuilt from a live sibling"
            )
        trickle = _expert_trickle(checkpoint) if experts is not None else None
        if not any(p.requires_grad for p in module.parameters()):
            raise ConfigError(f"{type(module).__name__} has no trainable parameter to replicate")
        self.strategy = strategy
        self.runtime_config = runtime or RuntimeConfig()
        self.world = strategy.degree
        request = slice or SliceRequest(units=self.world, unit_cpus=self.runtime_config.unit_num_cpus)
        if request.units != self.world:
            raise ConfigError(
                f"SliceRequest(units={request.units}) does not match DataParallel(degree={self.world}); "
                "a slice holds one unit per replica"
            )
        init()
        self._keys = list(module.state_dict().keys())
        self.experts: SharedExperts | None = None
        if experts is not None:  # the experts go to units of their own, which every replica calls
            cfg, world = self.runtime_config, self.world
            self.experts = SharedExperts(module, experts, world, cfg, placer, world, trickle)
            request = dataclasses.replace(request, mesh_units=self.world + experts.degree)
        try:
            self._slice: Slice = reserve_replica_slice(request, placer)
        except BaseException:
            self._close_experts()
            raise
        try:
            options = [self._slice.actor_options(b) for b in self._slice.units]
            link = self.experts.link() if self.experts is not None else None
            self.group = ReplicaGroup(module, self.world, self.runtime_config, options, experts=link)
        except BaseException:
            self._slice.remove()
            self._close_experts()
            raise
        self._repair = SiblingRepair()
        self.group.supervisor = self._repair
        if self.experts is not None:
            self.group.experts_failed = self._expert_failed
        module.to("meta")  # the replicas hold the weights now
        self.module = module
        self._structure: tuple[int, int] | None = None  # (loss index, number of outputs)
        self._forwards: list[Call] = []  # the last forward's calls
        self._passes = 0  # backward passes since the last zero_grad
        self._optimizer: ReplicatedOptimizer | None = None
        self.recovered_experts: list[ExpertRollback] = []  # shared expert units rolled back, in order
        self._closed = False

    # -- what the training loop uses ----------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Forward on every replica's shard; returns the model's outputs as ``RemoteLoss`` (the loss)
        and ``RemoteOutput`` (each other output), without waiting for the replicas."""
        self._check_open()
        self._settle()
        shards = split_batch(args, kwargs, self.world, f"DataParallel(degree={self.world})")
        calls = self._forwards = self.group.forward(shards)
        if self._structure is None:  # the first call: learn what the model returns
            first = self.group.wait(self._forwards)[0]
            self._structure = (first["loss_index"], first["n_outputs"])
        loss_index, n = self._structure

        def backward() -> None:
            if calls is not self._forwards:
                raise RuntimeError("backward() of a loss whose forward is not the module's last one")
            self._backward()

        loss = RemoteLoss(lambda: [r["loss"] for r in self.group.wait(calls)], backward, self.world)
        if n == 1:
            return loss
        outputs = [RemoteOutput(lambda i=i: self.group.output(i)) for i in range(n)]
        return tuple(loss if i == loss_index else outputs[i] for i in range(n))

    def _backward(self) -> None:
        self._check_open()
        self._passes += 1
        self._submit("backward", "backward")

    def _step(self) -> None:
        if self.experts is not None:
            self._step_experts()
        self._submit("step", "optimizer", self._passes)
        self.group.step += 1

    def _step_experts(self) -> None:
        """Once every replica's calls to the expert units are in, step the units and keep their
        snapshots, before the replicas step; a unit that fails sends the step back to its start."""
        for attempt in range(self.group.max_recoveries + 1):
            # every journaled call, forwards first: a replica's backward fails too when its forward
            # failed on a dead expert unit, and the forward's failure is the one that names the unit
            self.group.wait([c for entry in self.group.journal for c in entry.calls])
            self.experts.step()
            try:
                self.experts.settle()
                return
            except UnitFault as fault:
                if attempt == self.group.max_recoveries:
                    raise
                self._expert_failed(fault)

    def _expert_failed(self, fault: UnitFault) -> None:
        """Expert unit ``fault.unit`` failed: every expert unit back to its last snapshot (the step's
        start), every replica redoes the step's calls (``SiblingRepair`` calls this too)."""
        start = time.monotonic()
        self.group.rewind(self.experts.roll_back())
        self.recovered_experts.append(
            ExpertRollback(
                unit=self.world + fault.unit,
                phase=fault.phase,
                kind=type(fault).__name__,
                snapshot_step=self.experts.runtime.step,
                recovery_s=time.monotonic() - start,
            )
        )

    def _zero_grad(self) -> None:
        self._passes = 0
        self._submit("zero_grad", "control")
        if self.experts is not None:
            self.experts.zero_grad()

    def _submit(self, method: str, phase: str, *args: Any) -> None:
        self.group.submit(method, phase, [args] * self.world)

    def _settle(self) -> None:
        """Wait (within the deadline) for the calls sent without waiting; a dead replica is rebuilt
        here (``control.sibling_repair``) and a failure that cannot be repaired surfaces here."""
        self.group.settle()
        if self.experts is not None:
            self.experts.settle()

    def optimizer(self, optimizer_cls: type[torch.optim.Optimizer], **kwargs: Any) -> ReplicatedOptimizer:
        """An ``optimizer_cls(**kwargs)`` on every replica, over its copy of the parameters."""
        self._check_open()
        self._settle()
        self.group.wait(self.group.each("set_optimizer", "control", optimizer_cls, kwargs))
        self.group.optimizer_args = (optimizer_cls, kwargs)
        if self.experts is not None:
            self.experts.set_optimizer(optimizer_cls, kwargs)
        self._optimizer = ReplicatedOptimizer(self)
        return self._optimizer

    def train(self, mode: bool = True) -> DataParallelModule:
        self._submit("train", "control", mode)
        return self

    def eval(self) -> DataParallelModule:
        return self.train(False)

    # -- state ----------------------------------------------------------------------------------------

    @property
    def units(self) -> list[UnitRecord]:
        """One record per unit: the replicas (role ``"data"``, data rank, the node of its bundle), then
        the expert units (role ``"expert"``, the experts each hosts) when there are any."""
        replicas = [
            UnitRecord(index=r, role="data", node_id=b.node_id, experts=(), data_rank=r)
            for r, b in enumerate(self._slice.units)
        ]
        return replicas + (self.experts.units(self.world) if self.experts is not None else [])

    @property
    def recoveries(self) -> list[ReplicaRecovery]:
        """Every replica rebuilt from a sibling so far."""
        return list(self._repair.events)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The model's state with the wrapped module's keys, from replica 0 (all replicas agree)."""
        self._check_open()
        self._settle()
        state = {k: torch.from_numpy(np.array(v)) for k, v in self.group.state_dict().items()}
        if self.experts is not None:
            state.update(self.experts.state_dict())
        return {k: state[k] for k in self._keys}

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        self._check_open()
        missing, unexpected = set(self._keys) - set(state_dict), set(state_dict) - set(self._keys)
        if missing or unexpected:
            raise KeyError(
                f"state dict does not match the model: missing {sorted(missing)[:5]}, unexpected "
                f"{sorted(unexpected)[:5]}"
            )
        if self.experts is not None:
            raise UnsupportedError(
                "load_state_dict of a data-parallel model with expert units does not run in this version "
                "of zetta_ray; load the state into the plain model before zr.parallelize"
            )
        tensors = {k: v.detach().cpu().numpy() for k, v in state_dict.items()}
        self._settle()
        self.group.wait(self.group.each("load_state_dict", "control", tensors))


class ReplicatedOptimizer:
    """Looks like a ``torch.optim.Optimizer`` to the loop: each replica steps its own copy, after
    reducing the gradients with its siblings."""

    def __init__(self, owner: DataParallelModule):
        self._owner = owner

    def step(self) -> None:
        self._owner._step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._owner._zero_grad()

    def state_dict(self) -> dict[str, Any]:
        """Replica 0's optimizer state (every replica holds the same)."""
        owner = self._owner
        owner._settle()
        return tree_from_wire(owner.group.wait([owner.group.call(0, "optimizer_state", "control")])[0])


def _expert_trickle(checkpoint: TrickleCheckpoint | Literal[False] | None) -> TrickleCheckpoint | None:
    """The shared expert units' snapshots: on by default, off with ``False``; in MemoryPools only."""
    if checkpoint is False:
        return None
    trickle = checkpoint or TrickleCheckpoint()
    if trickle.durable_uri is not None:
        raise UnsupportedError(
            f"durable checkpoints of data-parallel replicas and their expert units (durable_uri="
            f"{trickle.durable_uri!r}) are not written by this version of zetta_ray; leave durable_uri unset"
        )
    return trickle
