"""The layer researchers touch: cluster, mesh, strategies, parallelize, the distributed optimizer.

- ``cluster.py``: ``init``, which starts or joins a Ray cluster (``ray.init``), declaring unit kinds as
  custom resources. The one file here that calls Ray.
- ``mesh.py``: ``mesh`` and the strategies ``ExpertParallel``, ``DataParallel``, ``PipelineParallel``
  Pure.
- ``parallelize.py``: ``parallelize``, which resolves the strategies against the mesh and builds a
  ``DistributedModule`` (experts) or a ``DataParallelModule`` (dense replicas).
- ``distributed.py``: ``DistributedModule``, which wires a slice (``placement``), the runtime's units
  (``runtime``) and the fault manager (``control``) to the model; those parts make the Ray calls.
- ``data_parallel.py``: ``DataParallelModule``, a dense model's replicas on units (``runtime.replicas``);
  the loss and outputs stay on the replicas until read (``RemoteLoss``, ``RemoteOutput``).
- ``lifetime.py``: ``Lifetime``, the context-manager end both modules share. Pure.
- ``pipeline_parallel.py``: ``PipelineModule``, a dense model's layers as pipeline stages on units
  (``runtime.stages``), micro-batches on a 1F1B or GPipe schedule.
- ``remote.py``: ``RemoteLoss``, ``RemoteOutput`` and ``split_batch``, shared by both. Pure.
- ``units.py``: ``UnitRecord``, one per unit in ``DistributedModule.units``. Pure.
- ``optim.py``: ``DistributedOptimizer``, the local optimizer plus one per unit, through the runtime.
"""

from zetta_ray.api.cluster import init
from zetta_ray.api.data_parallel import DataParallelModule
from zetta_ray.api.distributed import DistributedModule
from zetta_ray.api.mesh import DataParallel, ExpertParallel, Mesh, PipelineParallel, current_mesh, mesh
from zetta_ray.api.optim import DistributedOptimizer
from zetta_ray.api.parallelize import parallelize
from zetta_ray.api.pipeline_parallel import PipelineModule
from zetta_ray.api.units import UnitRecord

__all__ = [
    "DataParallel",
    "DataParallelModule",
    "DistributedModule",
    "DistributedOptimizer",
    "PipelineModule",
    "ExpertParallel",
    "Mesh",
    "PipelineParallel",
    "UnitRecord",
    "current_mesh",
    "init",
    "mesh",
    "parallelize",
]
