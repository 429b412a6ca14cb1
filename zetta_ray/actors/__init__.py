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
- ``buckets.py``: ``GradBuckets`` and ``BucketReducer``, the gradient buckets a data-parallel dense
  replica fills during backward and their reduction in replica order (issue 18's first piece; no unit
  uses them yet). No Ray.

The classes run in a plain process too (the unit tests build a ``ComputeUnit`` directly).
"""

from zetta_ray.actors.compute_unit import ComputeUnit, ComputeUnitActor

__all__ = ["ComputeUnit", "ComputeUnitActor"]
