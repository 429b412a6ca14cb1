"""``PipelineModule``: a dense model's layers split into pipeline stages on ComputeUnit actors.

``zr.parallelize(model, zr.PipelineParallel(stages=P, microbatches=M))`` builds one for a model without
MoE layers that says how it splits (the pipeline protocol):

    class MyModel(nn.Module):
        def pipeline_layers(self) -> list[nn.Module]:
            # h = layers[0](x); h = layers[i](h) for each middle layer; the last takes (h, y) and
            # returns the loss (or (logits, loss)), as forward(x, y) does
            return [self.embed, *self.blocks, self.head_and_loss]

The layers are cut into ``P`` contiguous stages of near-equal layer counts. ``dmodel(x, y)`` splits the
batch into ``M`` micro-batches, sends them to the first stage and their targets to the last, and every
stage runs its schedule (1F1B or GPipe: ``actors/pipeline_stage.py``): activations and gradients flow
stage to stage, this process receives the micro-batch losses. The loss is their mean; the update equals
one process that accumulates ``(loss_m / M).backward()`` over the micro-batches and steps once.

With ``zr.DataParallel(degree=D)`` too, D such pipelines (their stages packed on a node where one has
room, the pipelines spread over failure domains) each take 1/D of the batch in ``M`` micro-batches
and reduce their gradients stage by stage at every optimizer step: the update equals one process
accumulating all ``D * M`` micro-batches. Each stage (of replica 0: one copy per stage) hands its
state to a MemoryPool actor after every step; a stage that dies is rebuilt from it and the step
replayed (``control/stage_repair.py``); ``checkpoint=False`` turns that off.

The backward runs with the forward (that is what a pipeline schedule is); ``loss.backward()`` commits
its parameter gradients, so a training-mode forward whose loss is never differentiated changes
nothing. Under ``torch.no_grad()`` or ``eval()`` the stages run forward only.
Ray is reached through ``api.cluster.init``, the slice and the stage group; nothing here calls Ray.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from zetta_ray.actors.wire import tree_from_wire
from zetta_ray.api.cluster import init
from zetta_ray.api.expert_units import SharedExperts
from zetta_ray.api.lifetime import GroupModule
from zetta_ray.api.mesh import DataParallel, ExpertParallel, PipelineParallel
from zetta_ray.api.remote import RemoteLoss, RemoteOutput, split_batch
from zetta_ray.api.units import UnitRecord
from zetta_ray.checkpoint import TrickleCheckpoint
from zetta_ray.config import RuntimeConfig
from zetta_ray.control.stage_repair import StageRecovery, StageRepair
from zetta_ray.errors import ConfigError, UnsupportedError
from zetta_ray.placement.plan import PlacerConfig
from zetta_ray.placement.slice_plan import SliceRequest
from zetta_ray.placement.slices import Slice, reserve_replica_slice
from zetta_ray.runtime.calls import Call
from zetta_ray.runtime.stages import StageGroup

__all__ = ["PipelineModule", "split_stages"]


def split_stages(n_layers: int, stages: int) -> list[range]:
    """``n_layers`` layers in ``stages`` contiguous runs whose lengths differ by at most one (the first
    stages take the extra layers)."""
    base, extra = divmod(n_layers, stages)
    bounds = [0]
    for s in range(stages):
        bounds.append(bounds[-1] + base + (1 if s < extra else 0))
    return [range(bounds[s], bounds[s + 1]) for s in range(stages)]


class PipelineModule(GroupModule):
    """A dense model's stages on compute units; see the module docstring. Use it as the plain module in
    the training loop (``logits, loss = dmodel(x, y)``, ``loss.backward()``, ``opt.step()``)."""

    _gone = "its stages are gone"

    def __init__(
        self,
        module: nn.Module,
        strategy: PipelineParallel,
        runtime: RuntimeConfig | None = None,
        slice: SliceRequest | None = None,
        placer: PlacerConfig | None = None,
        checkpoint: TrickleCheckpoint | Literal[False] | None = None,
        data: DataParallel | None = None,
        experts: ExpertParallel | None = None,
    ):
        trickle = _trickle(checkpoint, experts)
        self.strategy = strategy
        self.stages = strategy.stages
        self.replicas = data.degree if data is not None else 1
        self.microbatches = strategy.microbatches or 2 * strategy.stages
        self.runtime_config = runtime or RuntimeConfig()
        layers = _pipeline_layers(module, self.stages)
        runs = split_stages(len(layers), self.stages)
        self._keys = list(module.state_dict().keys())
        units = self.stages * self.replicas
        mesh_units = units + (experts.degree if experts is not None else 0)
        cpus = self.runtime_config.unit_num_cpus
        request = slice or SliceRequest(units=units, unit_cpus=cpus, mesh_units=mesh_units)
        if request.units != units:
            raise ConfigError(
                f"SliceRequest(units={request.units}) does not match PipelineParallel(stages="
                f"{self.stages}) x DataParallel(degree={self.replicas}); a slice holds one unit per "
                f"stage of each replica: units={units}"
            )
        init()
        if experts is not None:  # the experts go to units of their own, which the stages call
            self.experts = SharedExperts(module, experts, self.replicas, self.runtime_config, placer, units)
        spread = self.replicas > 1  # replicas in different failure domains, each one's stages packed
        try:
            self._where = _key_map(module, layers, runs)  # model key -> (stage, stage key), experts not
            self._slice: Slice = reserve_replica_slice(request, placer, spread=spread, group=self.stages)
        except BaseException:
            self._close_experts()
            raise
        try:
            options = [self._slice.actor_options(b) for b in self._slice.units]
            self.group = StageGroup(
                [[layers[i] for i in run] for run in runs],
                self.runtime_config,
                options,
                microbatches=self.microbatches,
                kind=strategy.schedule,
                trickle=trickle,
                avoid={b.node_id for b in self._slice.units},
                replicas=self.replicas,
                experts=self.experts.link() if self.experts is not None else None,
            )
        except BaseException:
            self._slice.remove()
            self._close_experts()
            raise
        self.repair = StageRepair() if trickle is not None else None
        self.group.supervisor = self.repair
        module.to("meta")  # the stages hold the weights now
        self.module = module
        self._training = module.training
        self._run = 0  # runs (forwards) so far
        self._last: list[Call] = []
        self._structure: tuple[int, int] | None = None  # (loss index, number of outputs)
        self._pending: list[Call] = []
        self._closed = False

    # -- what the training loop uses ----------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self._check_open()
        self._settle()
        d, m = self.replicas, self.microbatches
        who = f"PipelineParallel(microbatches={m})" + (f" x DataParallel(degree={d})" if d > 1 else "")
        flat = split_batch(args, kwargs, d * m, who)
        parts = [flat[r * m : (r + 1) * m] for r in range(d)]  # replica r's shard, in micro-batches
        run = self._run = self._run + 1
        backward = self._training and torch.is_grad_enabled()
        calls = self._last = self.group.run(run, parts, backward)
        if self._structure is None:  # the first call: learn what the model returns
            answer = self.group.wait(calls)[self.group.last_stages()[0]]
            self._structure = (answer["loss_index"], answer["n_outputs"])

        def commit() -> None:
            if not backward:
                raise RuntimeError("backward() of a loss computed under torch.no_grad() or eval()")
            if calls is not self._last:
                raise RuntimeError("backward() of a loss whose forward is not the module's last one")
            self._pending += self.group.submit("commit", "backward", run)

        # the loss waits for every stage's run, so that a dead stage is seen at once, not at the deadline
        # of the last stage waiting for it
        last = self.group.last_stages()

        def losses() -> list[float]:
            done = self.group.wait(calls)
            return [loss for u in last for loss in done[u]["losses"]]

        loss = RemoteLoss(losses, commit, d * m)
        loss_index, n = self._structure
        if n == 1:
            return loss
        group = self.group  # the last stage numbers its outputs without the loss: j = i or i - 1
        outputs = [RemoteOutput(lambda j=j: group.output(j)) for j in range(n - 1)]
        return tuple(loss if i == loss_index else outputs[i - (i > loss_index)] for i in range(n))

    def _settle(self) -> None:
        """Wait (within the deadline) for the calls sent without waiting; a failure surfaces here (and
        with trickle snapshots on, a failed stage is rebuilt here)."""
        pending, self._pending = [*self._pending, *self._last], []
        if pending:
            self.group.wait(pending)
        self.group.settle()
        if self.experts is not None:
            self.experts.settle()

    def pool_handles(self) -> dict[str, Any]:
        """The MemoryPool actors that hold the stages' snapshots, by name (``zr.chaos`` kills them)."""
        self._check_open()
        return {f"stage-pool-{i}": pool for i, pool in enumerate(self.group.pools)}

    @property
    def recoveries(self) -> list[StageRecovery]:
        """The stages rebuilt so far, oldest first."""
        return list(self.repair.events) if self.repair is not None else []

    def optimizer(self, optimizer_cls: type[torch.optim.Optimizer], **kwargs: Any) -> PipelineOptimizer:
        """An ``optimizer_cls(**kwargs)`` on every stage, over its layers' parameters."""
        self._check_open()
        self.group.optimizer_args = (optimizer_cls, kwargs)
        self.group.wait(self.group.submit("set_optimizer", "control", optimizer_cls, kwargs))
        if self.experts is not None:
            self.experts.set_optimizer(optimizer_cls, kwargs)
        return PipelineOptimizer(self)

    def train(self, mode: bool = True) -> PipelineModule:
        self._training = mode
        self._pending += self.group.submit("train", "control", mode)
        return self

    def eval(self) -> PipelineModule:
        return self.train(False)

    # -- state ----------------------------------------------------------------------------------------

    @property
    def units(self) -> list[UnitRecord]:
        """One record per unit (role ``"stage"``, its stage and data rank, the node of its bundle)."""
        return [
            UnitRecord(
                index=u,
                role="stage",
                node_id=b.node_id,
                experts=(),
                stage=u % self.stages,
                data_rank=u // self.stages,
            )
            for u, b in enumerate(self._slice.units)
        ] + (self.experts.units(len(self._slice.units)) if self.experts is not None else [])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The model's state with the wrapped module's keys, gathered from the stages."""
        self._check_open()
        self._settle()
        by_stage = self.group.wait([self.group.call(s, "state_dict", "control") for s in range(self.stages)])
        state = {k: torch.from_numpy(np.array(by_stage[s][name])) for k, (s, name) in self._where.items()}
        if self.experts is not None:
            state.update(self.experts.state_dict())
        return {k: state[k] for k in self._keys}


class PipelineOptimizer:
    """Looks like a ``torch.optim.Optimizer`` to the loop: each stage steps its own layers."""

    def __init__(self, owner: PipelineModule):
        self._owner = owner

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        raise UnsupportedError("a pipelined optimizer's param_groups live on the stages")

    def step(self) -> None:
        owner = self._owner
        if owner.experts is not None:  # every stage's calls to the expert units are in: step them
            owner.group.wait([*owner._pending, *owner._last])
            owner.experts.step()
        owner._pending += owner.group.submit("step", "optimizer")
        owner.group.step += 1
        owner._pending += owner.group.after_step(owner.group.step)

    def zero_grad(self, set_to_none: bool = True) -> None:
        owner = self._owner
        owner._pending += owner.group.submit("new_epoch", "control")
        if owner.experts is not None:
            owner.experts.zero_grad()
        owner._pending += owner.group.submit("discard", "control", owner._run + 1)

    def state_dict(self) -> dict[str, Any]:
        """Every stage's optimizer state, by stage."""
        owner = self._owner
        owner._settle()
        group = owner.group
        states = group.wait([group.call(s, "optimizer_state", "control") for s in range(group.stages)])
        return {"stages": [tree_from_wire(s) for s in states]}


def _key_map(module: nn.Module, layers: list[nn.Module], runs: list[range]) -> dict[str, tuple[int, str]]:
    """Every key of ``module.state_dict()`` -> (its stage, its key in that stage's ``state_dict``).
    Every tensor must belong to exactly one layer of ``pipeline_layers()``."""
    prefix = {id(m): name for name, m in module.named_modules(remove_duplicate=False)}
    where: dict[str, tuple[int, str]] = {}
    owner: dict[int, int] = {}  # parameter id -> stage
    for s, run in enumerate(runs):
        for j, i in enumerate(run):
            layer = layers[i]
            if id(layer) not in prefix:
                raise ConfigError(f"pipeline_layers()[{i}] ({type(layer).__name__}) is not a submodule")
            for p in layer.parameters():
                if owner.setdefault(id(p), s) != s:
                    raise ConfigError(
                        f"a parameter of pipeline_layers()[{i}] is shared with stage {owner[id(p)]} "
                        f"(tied weights); stage {s} cannot hold it too: untie it, or keep the layers "
                        "that share it in one stage"
                    )
            base = prefix[id(layer)]
            for name in layer.state_dict():
                where[f"{base}.{name}" if base else name] = (s, f"{j}.{name}")
    missing = [k for k in module.state_dict() if k not in where]
    if missing:
        raise ConfigError(
            f"{type(module).__name__}'s state {missing[:5]} belongs to no layer of pipeline_layers(); "
            "every parameter and buffer must be in one of its layers"
        )
    return {k: where[k] for k in module.state_dict()}


def _trickle(
    checkpoint: TrickleCheckpoint | Literal[False] | None, experts: ExpertParallel | None
) -> TrickleCheckpoint | None:
    """The stages' snapshot settings: on by default (``TrickleCheckpoint()``), off with ``False``; off
    with shared expert units, which a rollback of the stages would need to follow."""
    if experts is not None:
        if checkpoint not in (None, False):
            raise UnsupportedError(
                f"trickle checkpoints of pipeline stages with {experts!r} do not run in this version of "
                "zetta_ray: rolling the stages back would need the shared expert units rolled back too; "
                "pass checkpoint=False or leave it out (a dead unit then stops the run with UnitFailed)"
            )
        return None
    if checkpoint is False:
        return None
    trickle = checkpoint if checkpoint is not None else TrickleCheckpoint()
    if trickle.durable_uri is not None:
        raise UnsupportedError(
            f"durable checkpoints of pipeline stages (durable_uri={trickle.durable_uri!r}) are not "
            "written by this version of zetta_ray: their snapshots live in MemoryPool actors only; "
            "leave durable_uri unset"
        )
    return trickle


def _pipeline_layers(module: nn.Module, stages: int) -> list[nn.Module]:
    split = getattr(module, "pipeline_layers", None)
    if not callable(split):
        raise ConfigError(
            f"{type(module).__name__} does not say how to split into stages: give it a method "
            "pipeline_layers() returning its layers in order (the first takes x, the last takes (h, y) "
            "and returns the loss, or (logits, loss)); see zetta_ray.api.pipeline_parallel"
        )
    layers = list(split())
    if not all(isinstance(layer, nn.Module) for layer in layers):
        raise ConfigError(f"{type(module).__name__}.pipeline_layers() must return nn.Module objects")
    if len(layers) < stages:
        raise ConfigError(
            f"PipelineParallel(stages={stages}) asks for more stages than {type(module).__name__} has "
            f"layers ({len(layers)} in pipeline_layers()); use at most {len(layers)} stages"
        )
    return layers
