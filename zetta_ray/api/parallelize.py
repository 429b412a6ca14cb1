"""``zr.parallelize``: turn a PyTorch MoE model into one whose experts run on Ray actors.

This module resolves the strategy (against an enclosing ``zr.mesh``) and builds a
``DistributedModule`` (``distributed.py``), which does the work; no Ray here.
"""

from __future__ import annotations

from typing import Any, Literal

from torch import nn

from zetta_ray.api.distributed import DistributedModule
from zetta_ray.api.mesh import ExpertParallel, Mesh, current_mesh
from zetta_ray.checkpoint import TrickleCheckpoint
from zetta_ray.config import RuntimeConfig
from zetta_ray.errors import ConfigError, UnsupportedError
from zetta_ray.placement.plan import PlacerConfig
from zetta_ray.placement.slice_plan import SliceRequest

__all__ = ["DistributedModule", "parallelize"]


def _resolve_strategy(strategy: ExpertParallel | None) -> ExpertParallel:
    m: Mesh | None = current_mesh()
    if m is not None and (m.data > 1 or m.pipeline > 1):
        raise UnsupportedError(
            f"zr.mesh(data={m.data}, pipeline={m.pipeline}): this version of zetta_ray runs expert "
            "parallelism only; use data=1 and pipeline=1"
        )
    if strategy is None:
        if m is None:
            raise ConfigError(
                "zr.parallelize needs a strategy: pass strategy=zr.ExpertParallel(degree=E) or call it "
                "inside zr.mesh(expert=E)"
            )
        return ExpertParallel(degree=m.expert)
    if not isinstance(strategy, ExpertParallel):
        raise ConfigError(f"strategy={strategy!r} is not supported; use zr.ExpertParallel(degree=E)")
    if m is not None and m.expert != strategy.degree:
        raise ConfigError(
            f"ExpertParallel(degree={strategy.degree}) does not match the enclosing "
            f"zr.mesh(expert={m.expert}); make them equal"
        )
    return strategy


def _decorate(cls: type[nn.Module], strategy: ExpertParallel | None, options: dict[str, Any]) -> type:
    class Parallelized(cls):  # type: ignore[misc, valid-type]
        def __new__(klass, *args: Any, **kwargs: Any) -> Any:
            module = cls(*args, **kwargs)  # a plain instance: Parallelized.__init__ never runs
            if current_mesh() is None:
                return module
            return DistributedModule(module, _resolve_strategy(strategy), **options)

    Parallelized.__name__ = cls.__name__
    Parallelized.__qualname__ = cls.__qualname__
    Parallelized.__module__ = cls.__module__
    Parallelized.__doc__ = cls.__doc__
    return Parallelized


def parallelize(
    module: nn.Module | type | None = None,
    strategy: ExpertParallel | None = None,
    *,
    runtime: RuntimeConfig | None = None,
    slice: SliceRequest | None = None,
    placer: PlacerConfig | None = None,
    checkpoint: TrickleCheckpoint | Literal[False] | None = None,
) -> Any:
    """Distribute a module's experts over compute units.

    Three forms:

    * ``zr.parallelize(model, zr.ExpertParallel(degree=4))`` returns a ``DistributedModule``.
    * ``@zr.parallelize(strategy=zr.ExpertParallel(degree=4))`` on a class: instances built inside
      ``zr.mesh(...)`` come out distributed; outside a mesh they are plain modules.
    * Inside ``zr.mesh(expert=E)`` the strategy may be left out: ``ExpertParallel(degree=E)``.

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
    if module is None:
        return lambda target: parallelize(target, strategy, **options)
    if isinstance(module, type):
        return _decorate(module, strategy, options)
    if isinstance(module, DistributedModule):
        raise ConfigError("this module is already distributed; parallelize the plain nn.Module once")
    return DistributedModule(module, _resolve_strategy(strategy), **options)
