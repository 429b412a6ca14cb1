"""What the fault manager's parts need from the world around them, as ``typing.Protocol`` seams.

The parts of the fault manager (``liveness``, ``pools``, ``slots``, ``snapshots``, ``commits``,
``repair``, ``durable_writes``) never import Ray: everything they ask of the cluster goes through a
``Cluster``, everything they ask of the training side through a ``Runtime``, and they talk to actors
only through the handles these give them (``UnitActor``, ``PoolActor``: ``handle.method.remote(...)``
returns a reference that ``Cluster.get`` and ``Cluster.ready`` understand). ``control/ray_cluster.py``
is the ``Cluster`` of a real job; ``runtime.engine.ExpertRuntime`` is the ``Runtime``. The unit tests
drive the parts with fakes of these (``tests/unit/control_fakes.py``), so that every failure path runs
in milliseconds without a cluster, in the style of torchft's manager tests.

This module holds no code that runs: only the shapes of the seams.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

__all__ = ["Cluster", "Layout", "PendingCall", "PoolActor", "Remote", "Runtime", "UnitActor"]

Ref = Any  # what a remote call returns: a ``ray.ObjectRef``, or a fake's reference


class Remote(Protocol):
    """One remote method of an actor handle: ``handle.put.remote(...)`` sends the call, returns a ref."""

    def remote(self, *args: Any) -> Ref: ...


class PoolActor(Protocol):
    """A ``MemoryPoolActor`` handle (``actors/memory_pool.py``): the replicas of units' snapshots.

    ``put(unit, step, blob)``, ``get(unit, step)``, ``drop_before(unit, step)``, ``ping()``."""

    put: Remote
    get: Remote
    drop_before: Remote
    ping: Remote


class UnitActor(Protocol):
    """A ``ComputeUnitActor`` handle (``actors/compute_unit.py``), as far as the fault manager calls it.

    Snapshots: ``snapshot(step, copy)``, ``gradient_record(step, copy)``, ``stage_snapshot(step, slot)``,
    ``stage_gradients(step, slot)``, ``reserve_slots(record_names, full_names)``; recovery:
    ``restore(blob)``, then every journaled method by name (``forward``, ``backward``, ``step`` ...,
    reached with ``getattr``)."""

    snapshot: Remote
    gradient_record: Remote
    stage_snapshot: Remote
    stage_gradients: Remote
    reserve_slots: Remote
    restore: Remote


class Layout(Protocol):
    """Which experts a unit hosts (``runtime.engine.Layout``)."""

    def experts_of(self, unit: int) -> list[tuple[int, int]]: ...


class PendingCall(Protocol):
    """A call the runtime still waits for (``runtime.engine.Call``), sent at optimizer step ``step``.
    Recovery points ``ref`` at the replayed call's result when ``logged`` (the journal's record of the
    call) was replayed."""

    unit: int
    step: int
    ref: Ref
    logged: Any


class Runtime(Protocol):
    """What the fault manager uses of ``runtime.engine.ExpertRuntime``.

    Attributes:
        units: the unit actors, by index; recovery puts a replacement in its dead unit's place.
        step: optimizer steps completed (a snapshot of the current state is of this step).
        layout: which experts each unit hosts (named in faults).
        journal: set by ``FaultManager.attach`` to its ``ReplayLog``.
        supervisor: set by ``FaultManager.attach`` to the manager itself.
        node: the controller's node when units on it share memory with it, else None.
    """

    units: list[Any]
    step: int
    layout: Layout
    journal: Any
    supervisor: Any

    @property
    def node(self) -> str | None: ...

    def start_unit(self, u: int, **overrides: Any) -> Any:
        """A new actor for unit ``u`` built as the first was; ``overrides`` change where it runs."""
        ...

    def resend(self, call: Any) -> None:
        """Send ``call`` again to its unit's current actor."""
        ...


class Cluster(Protocol):
    """What the fault manager asks of the cluster (``control/ray_cluster.py``: Ray).

    Attributes:
        failure: the exception a failed or timed-out ``get`` raises (``ray.exceptions.RayError``, which
            covers ``GetTimeoutError``). A unit's or pool's own exception arrives as an instance of it
            that is also an instance of the original class, with the original as ``cause``.
    """

    failure: type[Exception]

    def nodes(self) -> list[dict[str, Any]]:
        """Every node as ``ray.nodes()`` lists it: ``NodeID``, ``Alive``, ``NodeManagerAddress``..."""
        ...

    def raylet_answers(self, node: dict[str, Any]) -> bool:
        """Whether ``node``'s raylet accepts a connection now (``liveness.raylet_answers``)."""
        ...

    def start_pool(self, node: str, limit_bytes: int, name: str) -> PoolActor:
        """Start a MemoryPool actor pinned to ``node``."""
        ...

    def kill(self, actor: Any) -> None:
        """Kill an actor for good (no restart); a dead one is no error."""
        ...

    def get(self, refs: Any, timeout_s: float) -> Any:
        """The value(s) of ``refs`` (one ref or a list); raise ``failure`` if one failed or is late."""
        ...

    def ready(self, refs: Sequence[Ref], timeout_s: float) -> list[Ref]:
        """Those of ``refs`` that finished within ``timeout_s`` (0: now), without raising."""
        ...

    def node_affinity(self, node: str) -> Any:
        """A scheduling strategy that pins an actor to ``node`` (for ``Runtime.start_unit``)."""
        ...

    def by_value(self, args: tuple[Any, ...], timeout_s: float) -> tuple[Any, ...]:
        """``args`` with their rows carried by value (``runtime.engine.by_value``), for a replay."""
        ...
