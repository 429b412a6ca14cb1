"""The layer researchers touch: cluster, mesh, strategies, parallelize, the distributed optimizer."""

from zetta_ray.api.cluster import init
from zetta_ray.api.mesh import ExpertParallel, Mesh, current_mesh, mesh
from zetta_ray.api.optim import DistributedOptimizer
from zetta_ray.api.parallelize import DistributedModule, parallelize

__all__ = [
    "DistributedModule",
    "DistributedOptimizer",
    "ExpertParallel",
    "Mesh",
    "current_mesh",
    "init",
    "mesh",
    "parallelize",
]
