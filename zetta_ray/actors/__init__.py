"""The Ray actor classes, and what they hold. Actors never import ``runtime/`` or ``control/``.

- ``compute_unit.py``: ``ComputeUnit`` hosts experts (forward, backward, its own optimizer, snapshots);
  ``ComputeUnitActor`` is it as a Ray actor. Touches Ray: ``ray.remote``, the node id in ``ping``, and
  ``snapshot_to`` (``ray.put`` of a snapshot, handed to MemoryPool actors).
- ``memory_pool.py``: ``MemoryPool`` holds snapshot replicas; ``MemoryPoolActor`` is it as a Ray actor.
  Touches Ray: ``ray.remote`` and the node id in ``stats``.
- ``snapshot.py``: a unit's state as a ``checkpoint.Snapshot`` and back, through the ``UnitState``
  protocol (only ``compute_unit.py`` imports it). No Ray.
- ``shm.py``, ``wire.py``, ``staging.py``: rows and snapshots in shared memory between processes on one
  node, and the array form calls carry. No Ray.
- ``dense_replica.py``: ``DenseReplica`` holds one data-parallel copy of a dense model (forward and
  backward on its shard, gradient buckets to its peers, reduction, its optimizer); ``DenseReplicaActor``
  is it as a Ray actor. Touches Ray: ``ray.remote``, ``ray.put`` of each bucket for the peers, the node
  id in ``ping``.
- ``buckets.py``: ``GradBuckets`` and ``BucketReducer``, the gradient buckets a dense replica fills
  during backward and their reduction in replica order. No Ray.

The classes run in a plain process too (the unit tests build a ``ComputeUnit`` directly).
"""

from zetta_ray.actors.compute_unit import ComputeUnit, ComputeUnitActor

__all__ = ["ComputeUnit", "ComputeUnitActor"]
