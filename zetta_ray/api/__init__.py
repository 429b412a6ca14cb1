"""The layer researchers touch: cluster, mesh, strategies, parallelize, the distributed optimizer.

- ``cluster.py``: ``init``, which starts or joins a Ray cluster (``ray.init``), declaring unit kinds as
  custom resources. The one file here that calls Ray.
- ``mesh.py``: ``mesh`` and ``ExpertParallel``. Pure.
- ``parallelize.py``: ``parallelize``, which resolves the strategy and builds a ``DistributedModule``.
- ``distributed.py``: ``DistributedModule``, which wires a slice (``placement``), the runtime's units
  (``runtime``) and the fault manager (``control``) to the model; those parts make the Ray calls.
- ``units.py``: ``UnitRecord``, one per unit in ``DistributedModule.units``. Pure.
- ``optim.py``: ``DistributedOptimizer``, the local optimizer plus one per unit, through the runtime.
"""

from zetta_ray.api.cluster import init
from zetta_ray.api.distributed import DistributedModule
from zetta_ray.api.mesh import ExpertParallel, Mesh, current_mesh, mesh
from zetta_ray.api.optim import DistributedOptimizer
from zetta_ray.api.parallelize import parallelize
from zetta_ray.api.units import UnitRecord

__all__ = [
    "DistributedModule",
    "DistributedOptimizer",
    "ExpertParallel",
    "Mesh",
    "UnitRecord",
    "current_mesh",
    "init",
    "mesh",
    "parallelize",
]
