"""The logical mesh and parallelism strategies a researcher names."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

from zetta_ray.errors import ConfigError

__all__ = ["DataParallel", "ExpertParallel", "Mesh", "PipelineParallel", "current_mesh", "mesh"]


def _positive(owner: str, name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{owner}({name}={value!r}) is invalid: {name} must be a positive integer")


@dataclass(frozen=True, kw_only=True, slots=True)
class Mesh:
    """A logical grid of resources: ``expert`` units for experts, times ``data`` replicas, times
    ``pipeline`` stages. It says how many, not where; placement decides where."""

    expert: int = 1
    data: int = 1
    pipeline: int = 1

    def __post_init__(self) -> None:
        for name in ("expert", "data", "pipeline"):
            _positive("zr.mesh", name, getattr(self, name))


@dataclass(frozen=True, kw_only=True, slots=True)
class ExpertParallel:
    """Spread every MoE layer's experts over ``degree`` compute units.

    Each layer's expert count must be a multiple of ``degree``.
    """

    degree: int

    def __post_init__(self) -> None:
        _positive("zr.ExpertParallel", "degree", self.degree)


@dataclass(frozen=True, kw_only=True, slots=True)
class DataParallel:
    """Train ``degree`` replicas of the dense model, each on an equal shard of every batch (dim 0),
    with gradients reduced between them (the mean over replicas, in replica order)."""

    degree: int

    def __post_init__(self) -> None:
        _positive("zr.DataParallel", "degree", self.degree)


@dataclass(frozen=True, kw_only=True, slots=True)
class PipelineParallel:
    """Split the model's blocks into ``stages`` pipeline stages fed ``microbatches`` micro-batches per
    step (default ``2 * stages``), on the ``schedule`` ``"1f1b"`` or ``"gpipe"``. The model says how its
    layers split (``pipeline_layers()``; see ``zetta_ray.api.pipeline_parallel``)."""

    stages: int
    microbatches: int | None = None
    schedule: str = "1f1b"

    def __post_init__(self) -> None:
        _positive("zr.PipelineParallel", "stages", self.stages)
        if self.microbatches is not None:
            _positive("zr.PipelineParallel", "microbatches", self.microbatches)
        if self.schedule not in ("1f1b", "gpipe"):
            raise ConfigError(
                f"zr.PipelineParallel(schedule={self.schedule!r}) is invalid: use '1f1b' or 'gpipe'"
            )


_current: ContextVar[Mesh | None] = ContextVar("zetta_ray_mesh", default=None)


@contextmanager
def mesh(expert: int = 1, data: int = 1, pipeline: int = 1) -> Iterator[Mesh]:
    """Declare the logical mesh for modules built or parallelized inside the block.

    >>> with zr.mesh(expert=4):
    ...     dmodel = zr.parallelize(model, zr.ExpertParallel(degree=4))
    """
    token = _current.set(Mesh(expert=expert, data=data, pipeline=pipeline))
    try:
        yield _current.get()
    finally:
        _current.reset(token)


def current_mesh() -> Mesh | None:
    return _current.get()
