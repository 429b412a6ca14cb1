"""``DistributedModule``: a model whose MoE experts run on ComputeUnit actors.

``zr.parallelize`` (``parallelize.py``) builds one. This module wires the parts together: it reserves
the slice (``placement.slices``, a Ray placement group), starts the units through the runtime
(``runtime.ExpertRuntime``), attaches the fault manager (``control.FaultManager``) and swaps each
``MoELayer``'s experts for ``runtime.RemoteExperts``. It calls Ray only through ``api.cluster.init``;
the parts it wires make the Ray calls.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from zetta_ray.actors.wire import to_wire, tree_from_wire, tree_to_wire
from zetta_ray.api.cluster import init
from zetta_ray.api.lifetime import Lifetime
from zetta_ray.api.mesh import ExpertParallel
from zetta_ray.api.optim import DistributedOptimizer
from zetta_ray.api.units import UnitRecord
from zetta_ray.checkpoint import CheckpointInfo, DurableStore, Snapshot, TrickleCheckpoint
from zetta_ray.config import RuntimeConfig
from zetta_ray.control.durable import DENSE_PART, unit_part
from zetta_ray.control.manager import FaultManager, RecoveryEvent
from zetta_ray.errors import ConfigError
from zetta_ray.experts.moe import MoELayer
from zetta_ray.placement.cost import Workload
from zetta_ray.placement.plan import PlacerConfig
from zetta_ray.placement.slice_plan import SliceRequest
from zetta_ray.placement.slices import Slice, reserve_slice
from zetta_ray.runtime import ExpertRuntime, Layout, RemoteExperts

__all__ = ["DistributedModule"]


class DistributedModule(Lifetime):
    """A model whose MoE experts live on ComputeUnit actors; everything else stays in this process.

    Call it as you would call the wrapped module. ``parameters()`` are the local (dense) parameters;
    ``state_dict()`` gathers the whole model under the wrapped module's own keys. Close it (or use it as a
    context manager) to release its actors.
    """

    _gone = "its experts are gone"

    def __init__(
        self,
        module: nn.Module,
        strategy: ExpertParallel,
        runtime: RuntimeConfig | None = None,
        slice: SliceRequest | None = None,
        placer: PlacerConfig | None = None,
        checkpoint: TrickleCheckpoint | Literal[False] | None = None,
    ):
        self.strategy = strategy
        self.runtime_config = runtime or RuntimeConfig()
        layers = moe_layers(module, strategy)
        request = expert_slice_request(slice, strategy, self.runtime_config)
        init()
        self._keys = list(module.state_dict().keys())
        self._expert_prefix = {i: f"{name}.experts." for i, (name, _) in enumerate(layers)}
        experts = [list(layer.experts) for _, layer in layers]
        self._slice = reserve_slice(request, expert_workload([layer for _, layer in layers]), placer)
        self._runtime: ExpertRuntime | None = None
        self._faults: FaultManager | None = None
        self._optimizer: DistributedOptimizer | None = None
        self._data_position: Callable[[], dict[str, Any]] | None = None
        try:
            layout = Layout(request.units, self._slice.plan.unit_LE)
            options = [self._slice.actor_options(b) for b in self._slice.units]
            self._runtime = ExpertRuntime.launch(experts, layout, self.runtime_config, options)
            if checkpoint is not False:
                self._faults = FaultManager(
                    checkpoint or TrickleCheckpoint(),
                    unit_nodes=[b.node_id for b in self._slice.units],
                    spares=[(self._slice.actor_options(b), b.node_id) for b in self._slice.spares],
                    deadline_s=self.runtime_config.deadline_s,
                    start_deadline_s=self.runtime_config.start_deadline_s,
                )
                self._faults.attach(self._runtime)
                self._faults.snapshot(self._runtime, wait=True)  # step 0: restorable before the first step
        except BaseException:
            self._release()
            raise
        for i, (_, layer) in enumerate(layers):
            layer.experts = nn.ModuleList()  # the experts now live on the units
            layer.executor = RemoteExperts(self._runtime, i)
        self.module = module
        self._closed = False

    @property
    def placement(self) -> dict[tuple[int, int], dict[str, Any]]:
        """For every expert ``(layer, expert)``: its compute unit, the node the unit runs on now, and the
        slice bundle it was placed in (``None`` once a recovery moved it elsewhere)."""
        out = {}
        for layer, units in enumerate(self._runtime.layout.unit_LE):
            for expert, u in enumerate(units):
                bundle, node = self._slice.units[u], self._unit_node(u)
                index = bundle.index if node == bundle.node_id else None
                out[(layer, expert)] = {"unit": u, "node_id": node, "bundle": index}
        return out

    @property
    def units(self) -> list[UnitRecord]:
        """One record per compute unit, by index: its role, the node it runs on now and the experts it
        hosts. Known here, no remote call (``unit_stats()`` asks the units themselves)."""
        self._check_open()
        layout, node = self._runtime.layout, self._unit_node
        return [
            UnitRecord(index=u, role="expert", node_id=node(u), experts=tuple(layout.experts_of(u)))
            for u in range(len(self._runtime.units))
        ]

    def unit_stats(self) -> list[dict[str, Any]]:
        """Asks every unit (one remote call each, within the runtime's deadline): unit id, process id,
        node id, optimizer steps applied, activations held (``saved``) and calls served by phase."""
        self._check_open()
        return self._runtime.ping()

    def unit_handle(self, index: int) -> Any:
        """The Ray actor of unit ``index`` now (after a recovery: its replacement), for fault injection
        and diagnostics (``zr.chaos``). A call made on it bypasses the runtime's journal and deadlines:
        recovery cannot replay it, so call only what does not change the unit's training state."""
        self._check_open()
        return self._runtime.units[index]

    def pool_handles(self) -> dict[str, Any]:
        """The live MemoryPool actors that hold this module's snapshot replicas, by name in name order
        (empty with ``checkpoint=False``); for fault injection and diagnostics, as ``unit_handle``."""
        faults = self._faults
        if faults is None:
            return {}
        return {p: h for p, h in sorted(faults.pools.items()) if p not in faults.dead_pools}

    @property
    def faults(self) -> FaultManager | None:
        """The fault manager (``zetta_ray.control``) that snapshots the units, recovers them and writes
        durable checkpoints; None with ``checkpoint=False``. Read it to observe (``durable``, ``acked``,
        ``events``); this module drives it."""
        return self._faults

    @property
    def runtime(self) -> ExpertRuntime:
        """The dataflow engine (``zetta_ray.runtime``) that drives the units; for diagnostics and tests."""
        return self._runtime

    @property
    def slice(self) -> Slice:
        """The resource slice the units were placed on: its plan (``.plan``), Ray placement group
        (``.pg``) and bundles (``.units``, ``.spares``)."""
        return self._slice

    def _unit_node(self, u: int) -> str:
        """The node unit ``u`` runs on now: where the fault manager last put it, else its bundle's."""
        return self._faults.unit_nodes[u] if self._faults is not None else self._slice.units[u].node_id

    # -- what the training loop uses -----------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self._check_open()
        return self.module(*args, **kwargs)

    def parameters(self) -> Iterator[nn.Parameter]:
        return self.module.parameters()

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return self.module.named_parameters()

    def train(self, mode: bool = True) -> DistributedModule:
        self.module.train(mode)
        return self

    def eval(self) -> DistributedModule:
        return self.train(False)

    def optimizer(self, optimizer_cls: type[torch.optim.Optimizer], **kwargs: Any) -> DistributedOptimizer:
        """An optimizer of ``optimizer_cls(**kwargs)`` over the local parameters here and one per unit."""
        self._check_open()
        self._runtime.set_optimizer(optimizer_cls, kwargs)
        if self._faults is not None:
            self._faults.snapshot(self._runtime, wait=True)  # step 0 again, now with the optimizer
        local = optimizer_cls(self.module.parameters(), **kwargs)
        self._optimizer = DistributedOptimizer(local, self._runtime, after_step=self._after_step)
        return self._optimizer

    # -- durable checkpoints (TrickleCheckpoint.durable_uri; control/durable.py) ------------------------

    def track_data_position(self, position: Callable[[], dict[str, Any]]) -> None:
        """Store ``position()`` (the data loader's position, a small dict) in every durable checkpoint,
        taken right after the optimizer step it belongs to; ``load_checkpoint`` gives it back."""
        self._data_position = position

    def checkpoint(self) -> int | None:
        """Write a durable checkpoint of the current step now and wait until it and every scheduled one
        are complete; return its step (``None`` if this step has one already, or no step was taken).
        Needs ``durable_uri``."""
        durable = self._durable()
        due = self._optimizer is not None and durable.due(self.step, force=True)
        if due:
            self._faults.stage_durable(self._runtime, self._dense_snapshot())
        self._faults.finish_durable()
        return self.step if due else None

    def load_checkpoint(self, uri: str | None = None) -> CheckpointInfo | None:
        """Continue from the newest durable checkpoint under ``uri`` (default: ``durable_uri``) that
        verifies: every unit, the dense parameters, both optimizers and the RNG go back to its step.

        Call it after ``optimizer()``. Returns the checkpoint (its ``meta["data_position"]`` is what
        ``track_data_position`` recorded), or ``None`` if there is none; a corrupted newest checkpoint
        is reported by file name and the previous one is used.
        """
        self._check_open()
        if self._optimizer is None:
            raise RuntimeError("call load_checkpoint() after optimizer(): it restores optimizer state too")
        if uri is not None:
            store = DurableStore(uri)
        elif self._faults is not None and self._faults.durable is not None:
            store = self._faults.durable.store
        else:
            raise ConfigError(
                "load_checkpoint() needs a checkpoint location: pass uri=..., or parallelize with "
                "checkpoint=zr.TrickleCheckpoint(durable_uri=...)"
            )
        info = store.latest()
        if info is None:
            return None
        dense = store.load(info, DENSE_PART)
        _check_same_layout(dense.mesh.get("unit_LE"), self._layout_lists(), info, store)
        units = [store.load(info, unit_part(u)) for u in range(len(self._runtime.units))]
        self._runtime.restore(units, info.step, int(dense.extra["grad_epoch"]))
        self.module.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in dense.tensors.items()})
        self._optimizer.local.load_state_dict(tree_from_wire(dense.optimizer))
        torch.set_rng_state(torch.from_numpy(dense.rng["torch"].copy()))
        if self._faults is not None:
            self._faults.restarted_at(self._runtime)
        return info

    def _layout_lists(self) -> list[list[int]]:
        return [list(units) for units in self._runtime.layout.unit_LE]

    def _durable(self) -> Any:
        self._check_open()
        if self._faults is None or self._faults.durable is None:
            raise ConfigError(
                "durable checkpoints are off: parallelize with "
                "checkpoint=zr.TrickleCheckpoint(durable_uri=...)"
            )
        return self._faults.durable

    def _after_step(self) -> None:
        """After each optimizer step: stage a durable checkpoint when the schedule says so."""
        faults = self._faults
        if faults is not None and faults.durable is not None and faults.durable.due(self.step):
            faults.stage_durable(self._runtime, self._dense_snapshot())

    def _dense_snapshot(self) -> Snapshot:
        """A copy of what lives here: dense parameters, their optimizer, RNG, data position, mesh."""
        return Snapshot(
            step=self.step,
            tensors={k: v.detach().numpy().copy() for k, v in self.module.state_dict().items()},
            optimizer=tree_to_wire(self._optimizer.local.state_dict()),
            rng={"torch": torch.get_rng_state().numpy().copy()},
            data_position=self._data_position() if self._data_position is not None else {},
            mesh={"expert_degree": self.strategy.degree, "unit_LE": self._layout_lists()},
            extra={"grad_epoch": self._runtime.grad_epoch},
        )

    # -- state ----------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The full model state with exactly the wrapped module's keys, expert weights gathered."""
        self._check_open()
        local = self.module.state_dict()
        for name, value in self._runtime.state_dict().items():
            layer, rest = name.split(".", 1)
            local[self._expert_prefix[int(layer)] + rest] = torch.from_numpy(np.array(value))
        return {key: local[key] for key in self._keys}

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        self._check_open()
        missing, unexpected = set(self._keys) - set(state_dict), set(state_dict) - set(self._keys)
        if missing or unexpected:
            raise KeyError(
                f"state dict does not match the model: missing {sorted(missing)[:5]}, unexpected "
                f"{sorted(unexpected)[:5]}"
            )
        local, remote = {}, {}
        for key, value in state_dict.items():
            layer = next((i for i, p in self._expert_prefix.items() if key.startswith(p)), None)
            if layer is None:
                local[key] = value
            else:
                remote[f"{layer}.{key[len(self._expert_prefix[layer]) :]}"] = to_wire(value.detach().cpu())
        self.module.load_state_dict(local)
        self._runtime.load_state_dict(remote)

    @property
    def step(self) -> int:
        """Optimizer steps taken so far."""
        return self._runtime.step

    # -- lifetime -------------------------------------------------------------------------------------

    def close(self) -> None:
        """Kill every actor of this module and remove its placement group. Safe to call twice."""
        if not self._closed:
            self._closed = True
            self._release()

    def _release(self) -> None:
        try:
            try:
                if self._faults is not None:  # first: a durable write in flight still needs the units
                    self._faults.close()
            finally:
                if self._runtime is not None:
                    self._runtime.close()
        finally:
            self._slice.remove()

    @property
    def recoveries(self) -> list[RecoveryEvent]:
        """Every unit failure recovered so far: which unit, what failed, where it went, how long it took."""
        return list(self._faults.events) if self._faults is not None else []


def moe_layers(module: nn.Module, strategy: ExpertParallel) -> list[tuple[str, MoELayer]]:
    """The ``MoELayer``s of ``module`` by name, checked: there is one, none is parallelized already, and
    the expert degree divides each one's experts."""
    layers = [(name, m) for name, m in module.named_modules() if isinstance(m, MoELayer)]
    if not layers:
        raise ConfigError(
            f"{type(module).__name__} has no zr.MoELayer; zr.parallelize distributes the experts of "
            "MoELayer modules (build the model's MoE blocks from zetta_ray.experts.MoELayer)"
        )
    moved = [name for name, layer in layers if isinstance(layer.executor, RemoteExperts)]
    if moved:
        raise ConfigError(
            f"{type(module).__name__} is already parallelized (the experts of MoE layers {moved} run "
            "on the units of another DistributedModule); parallelize a fresh instance, or use the "
            "DistributedModule you have"
        )
    for name, layer in layers:
        if layer.n_experts % strategy.degree:
            raise ConfigError(
                f"ExpertParallel(degree={strategy.degree}) must divide the number of experts "
                f"({layer.n_experts}) of MoE layer {name!r}; choose a degree among the divisors of "
                f"{layer.n_experts}"
            )
    return layers


def _check_same_layout(saved: Any, have: list[list[int]], info: CheckpointInfo, store: DurableStore) -> None:
    if saved != have:
        raise ConfigError(
            f"the checkpoint of step {info.step} in {store.uri} was written by a module with expert "
            f"layout {saved} (unit of each expert, per layer); this module has {have}. Resume with the "
            "same model, ExpertParallel degree and placement"
        )


def expert_slice_request(
    slice: SliceRequest | None, strategy: ExpertParallel, cfg: RuntimeConfig
) -> SliceRequest:
    """``slice``, or one unit per degree by default; it must hold one unit per degree."""
    request = slice or SliceRequest(units=strategy.degree, unit_cpus=cfg.unit_num_cpus)
    if request.units != strategy.degree:
        raise ConfigError(
            f"SliceRequest(units={request.units}) does not match "
            f"ExpertParallel(degree={strategy.degree}); a slice holds one unit per degree"
        )
    return request


def expert_workload(layers: list[MoELayer], tokens_per_step: int = 8192) -> Workload:
    """What the placer needs to know of the model: expert count, shape and routing."""
    first = layers[0]
    d_model = first.gate.in_features
    params = sum(p.numel() for p in first.experts[0].parameters())
    return Workload(
        n_experts=first.n_experts,
        n_layers=len(layers),
        top_k=first.top_k,
        d_model=d_model,
        d_ff=max(1, params // (2 * d_model)),
        tokens_per_step=tokens_per_step,
        capacity_factor=first.capacity_factor,
        replicas=0,
        activation_bytes=4,
    )
