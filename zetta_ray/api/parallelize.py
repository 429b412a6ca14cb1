"""``zr.parallelize``: turn a PyTorch MoE model into one whose experts run on Ray actors.

This module resolves the strategy (against an enclosing ``zr.mesh``) and builds a
``DistributedModule`` (``distributed.py``), which does the work; no Ray here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from zetta_ray.api.data_parallel import DataParallelModule
from zetta_ray.api.distributed import DistributedModule
from zetta_ray.api.mesh import DataParallel, ExpertParallel, Mesh, PipelineParallel, current_mesh
from zetta_ray.api.pipeline_parallel import PipelineModule
from zetta_ray.checkpoint import TrickleCheckpoint
from zetta_ray.config import RuntimeConfig
from zetta_ray.errors import ConfigError, UnsupportedError
from zetta_ray.experts.moe import MoELayer
from zetta_ray.placement.plan import PlacerConfig
from zetta_ray.placement.slice_plan import SliceRequest

__all__ = ["DistributedModule", "Strategies", "parallelize", "resolve_strategies"]


Strategy = ExpertParallel | DataParallel | PipelineParallel


@dataclass(frozen=True, slots=True)
class Strategies:
    """The strategies of one ``parallelize`` call, agreed with the enclosing mesh; None: not used."""

    expert: ExpertParallel | None = None
    data: DataParallel | None = None
    pipeline: PipelineParallel | None = None


_DIMS = (
    ("expert", ExpertParallel, "degree"),
    ("data", DataParallel, "degree"),
    ("pipeline", PipelineParallel, "stages"),
)


def resolve_strategies(module: nn.Module, strategies: tuple[Any, ...]) -> Strategies:
    """``strategies`` checked (one of each kind at most) and agreed with the enclosing ``zr.mesh``: a
    strategy must match its mesh dimension (the error names both); a dimension above 1 without its
    strategy gets a default one (``DataParallel(D)``, ``PipelineParallel(P, microbatches=2*P)``, and
    ``ExpertParallel(E)``, which a model with MoE layers gets inside any mesh)."""
    given: dict[str, Any] = {}
    for s in strategies:
        dim = next((d for d, cls, _ in _DIMS if isinstance(s, cls)), None)
        if dim is None:
            raise ConfigError(
                f"strategy {s!r} is not supported; use zr.ExpertParallel(degree=E), "
                "zr.DataParallel(degree=D) or zr.PipelineParallel(stages=P)"
            )
        if dim in given:
            raise ConfigError(
                f"two {type(s).__name__} strategies ({given[dim]!r}, {s!r}); pass one of each kind"
            )
        given[dim] = s
    m: Mesh | None = current_mesh()
    if m is None and not given:
        raise ConfigError(
            "zr.parallelize needs a strategy: pass zr.ExpertParallel(degree=E) (and/or "
            "zr.DataParallel(degree=D)), or call it inside zr.mesh(expert=E, data=D)"
        )
    if m is not None:
        for dim, _, field in _DIMS:
            size = getattr(m, dim)
            if dim in given and getattr(given[dim], field) != size:
                raise ConfigError(
                    f"{given[dim]!r} does not match the enclosing zr.mesh({dim}={size}); make them equal"
                )
        if "data" not in given and m.data > 1:
            given["data"] = DataParallel(degree=m.data)
        if "pipeline" not in given and m.pipeline > 1:
            given["pipeline"] = PipelineParallel(stages=m.pipeline, microbatches=2 * m.pipeline)
        if "expert" not in given and (m.expert > 1 or has_moe_layers(module)):
            given["expert"] = ExpertParallel(degree=m.expert)
    return Strategies(**given)


def has_moe_layers(module: nn.Module) -> bool:
    return any(isinstance(m, MoELayer) for m in module.modules())


def _build(module: nn.Module, strategies: tuple[Any, ...], options: dict[str, Any]) -> Any:
    chosen = resolve_strategies(module, strategies)
    moe = has_moe_layers(module)
    if chosen.expert is not None and (chosen.data or chosen.pipeline) and not moe:
        raise UnsupportedError(
            f"{chosen.expert!r} on {type(module).__name__}, which has no zr.MoELayer: there are no "
            "experts to put on expert units; leave ExpertParallel out"
        )
    expert = chosen.expert or (ExpertParallel(degree=1) if moe else None)
    if chosen.pipeline is not None:
        return PipelineModule(module, chosen.pipeline, data=chosen.data, experts=expert, **options)
    if chosen.data is not None and moe:
        return DataParallelModule(module, chosen.data, experts=expert, **options)
    if chosen.data is not None:
        return DataParallelModule(module, chosen.data, **options)
    return DistributedModule(module, chosen.expert, **options)


def _decorate(cls: type[nn.Module], strategies: tuple[Any, ...], options: dict[str, Any]) -> type:
    class Parallelized(cls):  # type: ignore[misc, valid-type]
        def __new__(klass, *args: Any, **kwargs: Any) -> Any:
            module = cls(*args, **kwargs)  # a plain instance: Parallelized.__init__ never runs
            if current_mesh() is None:
                return module
            return _build(module, strategies, options)

    Parallelized.__name__ = cls.__name__
    Parallelized.__qualname__ = cls.__qualname__
    Parallelized.__module__ = cls.__module__
    Parallelized.__doc__ = cls.__doc__
    return Parallelized


def parallelize(
    module: nn.Module | type | None = None,
    *strategies: Strategy,
    strategy: Strategy | None = None,
    runtime: RuntimeConfig | None = None,
    slice: SliceRequest | None = None,
    placer: PlacerConfig | None = None,
    checkpoint: TrickleCheckpoint | Literal[False] | None = None,
) -> Any:
    """Distribute a module over compute units.

    Three forms:

    * ``zr.parallelize(model, zr.ExpertParallel(degree=4))`` returns a ``DistributedModule``, whose MoE
      experts run on 4 units; ``zr.parallelize(model, zr.DataParallel(degree=2))`` a
      ``DataParallelModule``, whose 2 units each train a copy of the model on half of every batch.
    * ``@zr.parallelize(strategy=zr.ExpertParallel(degree=4))`` on a class: instances built inside
      ``zr.mesh(...)`` come out distributed; outside a mesh they are plain modules.
    * Inside ``zr.mesh(expert=E, data=D)`` the strategies may be left out (see ``resolve_strategies``).

    Strategies compose as ``zr.parallelize(model, *strategies)``: ``DataParallel`` with
    ``PipelineParallel`` gives D pipelines of P stages (a ``PipelineModule``); ``DataParallel`` with
    ``ExpertParallel`` on an MoE model gives D dense replicas sharing E expert units (a
    ``DataParallelModule``); all three give D pipelines whose stages call the shared expert units.

    ``slice`` says what to reserve (unit kind, spares; default: ``degree`` units of the best kind the
    cluster has) and ``placer`` how to place experts on it; the units come from one Ray placement group,
    each pinned to the node the placer chose (see ``DistributedModule.placement``).

    ``checkpoint`` configures trickle checkpointing and transparent recovery, on by default
    (``zr.TrickleCheckpoint()``: a snapshot of every unit after every step, held by MemoryPool actors on
    two other nodes where they exist); a unit that dies or stalls is replaced and training goes on with
    bit-identical results. ``checkpoint=False`` turns it off: faults then raise.

    The module is modified in place: its experts move to the units. Take ``state_dict()`` from the
    returned ``DistributedModule``.
    """
    options = {"runtime": runtime, "slice": slice, "placer": placer, "checkpoint": checkpoint}
    strategies = (*strategies, *([strategy] if strategy is not None else []))
    if module is None:
        return lambda target: parallelize(target, *strategies, **options)
    if isinstance(module, type):
        return _decorate(module, strategies, options)
    if isinstance(module, (DistributedModule, DataParallelModule, PipelineModule)):
        raise ConfigError("this module is already distributed; parallelize the plain nn.Module once")
    return _build(module, strategies, options)
