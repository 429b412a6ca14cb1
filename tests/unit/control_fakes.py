"""Fakes of the fault manager's seams (``zetta_ray/control/seams.py``): a cluster, pools, units, a runtime.

No Ray: a remote call runs in the fake at once (or is held, for a unit told to ``hold_snapshots``) and
returns a ``FakeRef`` whose state is read when the manager waits for it. Every call the manager makes
is appended to ``FakeCluster.calls`` as a tuple, so a test asserts which pool was asked for what, and in
which order a replacement was restored and replayed.

``FakeRuntime`` drives the manager as ``runtime.engine.ExpertRuntime`` does: it journals each call
(``journal.record``), sends it, waits for the results, and hands a failure to ``supervisor.recover``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ray.exceptions import ActorDiedError

from zetta_ray.errors import PoolFullError, SnapshotNotHeldError, UnitFailed

PENDING, OK, ERR = "pending", "ok", "err"


class FakeRayError(Exception):
    """What ``FakeCluster.get`` raises for a failed or late call (``Cluster.failure``)."""

    def __init__(self, message: str, cause: BaseException | None = None):
        super().__init__(message)
        self.cause = cause


class FakeRef:
    """A remote call's result: ``state()`` is (PENDING | OK | ERR, value or exception)."""

    def __init__(self, state: Callable[[], tuple[str, Any]]):
        self._state = state
        self._final: tuple[str, Any] | None = None

    def state(self) -> tuple[str, Any]:
        if self._final is None:
            now = self._state()
            if now[0] == PENDING:
                return now
            self._final = now
        return self._final


def died(name: str) -> FakeRayError:
    """A call to a dead actor: its cause is Ray's own ``ActorDiedError`` (an exception class; nothing of
    Ray runs), which ``fault_from_error`` reads as a death, not the unit's own error."""
    return FakeRayError(f"the actor {name} died", ActorDiedError())


def done(value: Any = None) -> FakeRef:
    return FakeRef(lambda: (OK, value))


def failed(error: BaseException) -> FakeRef:
    return FakeRef(lambda: (ERR, error))


class _Method:
    def __init__(self, actor: Any, name: str):
        self.actor, self.name = actor, name

    def remote(self, *args: Any) -> FakeRef:
        return self.actor._call(self.name, args)


class FakeActor:
    """An actor handle: ``handle.<method>.remote(*args)`` calls ``_call(method, args)``.

    Setting ``dead`` kills it *now*: every call it was sent and has not answered fails, as a call in
    flight does when its actor dies. ``die()`` kills it between calls: what it was sent finishes first."""

    dead = False

    def die(self) -> None:
        for ref in self.__dict__.get("sent", []):
            ref.state()  # answered (or still held) before the death
        self.dead = True

    def __getattr__(self, name: str) -> _Method:
        if name.startswith("_"):
            raise AttributeError(name)
        return _Method(self, name)

    def _call(self, method: str, args: tuple[Any, ...]) -> FakeRef:
        raise NotImplementedError


class FakePool(FakeActor):
    """A MemoryPool: holds blobs by (unit, step); ``put`` stores a blob once it is made."""

    def __init__(self, cluster: FakeCluster, node: str, name: str, limit_bytes: int):
        self.cluster, self.node, self.name, self.limit_bytes = cluster, node, name, limit_bytes
        self.held: dict[tuple[int, int], Any] = {}
        self.refuse_full = False  # refuse every full snapshot (PoolFullError)

    def _call(self, method: str, args: tuple[Any, ...]) -> FakeRef:
        self.cluster.calls.append((method, self.name, *args[:2]))
        if method == "put":
            unit, step, blob = args
            return FakeRef(lambda: self._put(unit, step, blob))
        if self.dead:
            return failed(died(self.name))
        if method == "get":
            unit, step = args
            if (unit, step) not in self.held:
                return failed(
                    FakeRayError("not held", SnapshotNotHeldError(f"{self.name}: ({unit}, {step})"))
                )
            return done(self.held[unit, step])
        if method == "drop_before":
            unit, step = args
            for key in [k for k in self.held if k[0] == unit and k[1] < step]:
                del self.held[key]
            return done(0)
        return done(self.name)  # ping

    def _put(self, unit: int, step: int, blob: FakeRef) -> tuple[str, Any]:
        if self.dead:
            return ERR, died(self.name)
        status, value = blob.state()
        if status != OK:
            return status, FakeRayError("the blob is lost", value) if status == ERR else None
        if self.refuse_full and value["kind"] == "full":
            return ERR, PoolFullError(f"{self.name} has no room")
        if (unit, step) not in self.held or self.held[unit, step]["kind"] != "full":
            self.held[unit, step] = value
        return OK, None


class FakeUnit(FakeActor):
    """A ComputeUnit: its snapshots are dicts naming the unit, step and kind; other calls return their
    method name. ``hold_snapshots``: snapshots stay pending until the unit dies (then they fail)."""

    def __init__(self, cluster: FakeCluster, index: int, node: str, name: str):
        self.cluster, self.index, self.node, self.name = cluster, index, node, name
        self.hold_snapshots = False
        self.received: list[tuple[str, tuple[Any, ...]]] = []  # every call, in order
        self.sent: list[FakeRef] = []  # their results, in the same order

    def _call(self, method: str, args: tuple[Any, ...]) -> FakeRef:
        self.received.append((method, args))
        self.cluster.calls.append((method, self.name, *args[:1]))
        self.sent.append(self._answer(method, args))
        return self.sent[-1]

    def _answer(self, method: str, args: tuple[Any, ...]) -> FakeRef:
        if method == "restore":
            return FakeRef(lambda: self._restore(args[0]))
        kind = {"snapshot": "full", "stage_snapshot": "full", "gradient_record": "record"}
        kind["stage_gradients"] = "record"
        if method in kind:
            blob = {"unit": self.index, "step": args[0], "kind": kind[method]}
            ref = FakeRef(lambda: self._result(blob, held=self.hold_snapshots))
            ref.state()  # made now, unless held: a made blob outlives its unit (its node's object store)
            return ref
        return FakeRef(lambda: self._result(method))

    def _result(self, value: Any, held: bool = False) -> tuple[str, Any]:
        if self.dead:
            return ERR, died(self.name)
        return (PENDING, None) if held else (OK, value)

    def _restore(self, blob: FakeRef) -> tuple[str, Any]:
        if self.dead:
            return ERR, died(self.name)
        status, value = blob.state()
        if status == ERR:
            return ERR, value
        return status, value and value["step"]


class FakeCluster:
    """The ``Cluster`` seam. ``alive``: node -> listed alive; ``raylet_dead``: listed alive, but its
    raylet refuses (a node that just died)."""

    failure = FakeRayError

    def __init__(self, nodes: list[str]):
        self.alive = dict.fromkeys(nodes, True)
        self.raylet_dead: set[str] = set()
        self.calls: list[tuple[Any, ...]] = []
        self.pools: dict[str, FakePool] = {}

    def kill_node(self, node: str, units: list[FakeUnit]) -> None:
        """The node dies (its raylet refuses; the cluster has not noticed): its pools and units die."""
        self.raylet_dead.add(node)
        for actor in [*self.pools.values(), *units]:
            if actor.node == node:
                actor.die()

    def nodes(self) -> list[dict[str, Any]]:
        return [
            {"NodeID": n, "Alive": a, "NodeManagerAddress": n, "NodeManagerPort": 0}
            for n, a in self.alive.items()
        ]

    def raylet_answers(self, node: dict[str, Any]) -> bool:
        self.calls.append(("probe", node["NodeID"]))
        return node["NodeID"] not in self.raylet_dead

    def start_pool(self, node: str, limit_bytes: int, name: str) -> FakePool:
        self.calls.append(("start_pool", name, node))
        self.pools[name] = FakePool(self, node, name, limit_bytes)
        return self.pools[name]

    def kill(self, actor: FakeActor) -> None:
        self.calls.append(("kill", actor.name))
        actor.dead = True

    def get(self, refs: Any, timeout_s: float) -> Any:
        values = []
        for ref in refs if isinstance(refs, list) else [refs]:
            status, value = ref.state()
            if status == ERR:
                raise (
                    value
                    if isinstance(value, (FakeRayError, PoolFullError))
                    else FakeRayError("failed", value)
                )
            if status == PENDING:
                raise FakeRayError(f"timed out after {timeout_s} s")
            values.append(value)
        return values if isinstance(refs, list) else values[0]

    def ready(self, refs: list[FakeRef], timeout_s: float) -> list[FakeRef]:
        return [r for r in refs if r.state()[0] != PENDING]

    def node_affinity(self, node: str) -> tuple[str, str]:
        return ("affinity", node)

    def by_value(self, args: tuple[Any, ...], timeout_s: float) -> tuple[Any, ...]:
        return args


class FakeLayout:
    def __init__(self, n_units: int):
        self.n_units = n_units

    def experts_of(self, unit: int) -> list[tuple[int, int]]:
        return [(0, 2 * unit), (0, 2 * unit + 1)]


@dataclass
class FakeCall:
    """A call the runtime waits for (``runtime.engine.Call``)."""

    ref: FakeRef
    unit: int
    step: int
    phase: str
    method: str
    args: tuple[Any, ...]
    logged: Any = None
    resent: int = field(default=0)


class FakeRuntime:
    """The ``Runtime`` seam, driving its units as ``ExpertRuntime`` does (see the module docstring).

    ``die_on_arrival``: units whose next replacement dies before its restore is read."""

    def __init__(self, cluster: FakeCluster, unit_nodes: list[str], node: str | None = None):
        self.cluster = cluster
        self.layout = FakeLayout(len(unit_nodes))
        self.unit_nodes = list(unit_nodes)  # where each unit started (its bundle)
        self.units: list[Any] = [FakeUnit(cluster, u, n, f"unit{u}") for u, n in enumerate(unit_nodes)]
        self.step = 0
        self.node = node
        self.journal: Any = None
        self.supervisor: Any = None
        self.started: list[tuple[int, dict[str, Any]]] = []
        self.die_on_arrival: set[int] = set()
        self._pending: list[FakeCall] = []

    def start_unit(self, u: int, **overrides: Any) -> FakeUnit:
        self.started.append((u, overrides))
        self.cluster.calls.append(("start_unit", u))
        strategy = overrides.get("scheduling_strategy")
        node = strategy[1] if strategy else overrides.get("node", self.unit_nodes[u])
        unit = FakeUnit(self.cluster, u, node, f"unit{u}.{len(self.started)}")
        if u in self.die_on_arrival:
            self.die_on_arrival.discard(u)
            unit.dead = True
        return unit

    def resend(self, call: FakeCall) -> None:
        call.resent += 1
        call.ref = getattr(self.units[call.unit], call.method).remote(*call.args)

    # -- the training side --------------------------------------------------------------------------------

    def send(self, method: str, phase: str, *args: Any) -> list[FakeCall]:
        """``method(*args)`` to every unit, journaled like ``ExpertRuntime._submit``."""
        calls = []
        for u, unit in enumerate(self.units):
            logged = self.journal.record(u, method, self.step, args) if self.journal is not None else None
            ref = getattr(unit, method).remote(*args)
            calls.append(FakeCall(ref, u, self.step, phase, method, args, logged))
        return calls

    def gather(self, calls: list[FakeCall]) -> list[Any]:
        """Wait for the pending calls and ``calls``; a failed one goes to ``supervisor.recover``."""
        everything, self._pending = self._pending + calls, []
        while True:
            failed_call = next((c for c in everything if c.ref.state()[0] != OK), None)
            if failed_call is None:
                return [c.ref.state()[1] for c in calls]
            c, error = failed_call, failed_call.ref.state()[1]
            cause = getattr(error, "cause", None) or error
            fault = UnitFailed(
                unit=c.unit, experts=self.layout.experts_of(c.unit), step=c.step, phase=c.phase, cause=cause
            )
            self.supervisor.recover(self, fault, everything)

    def forward(self) -> list[Any]:
        return self.gather(self.send("forward", "forward", (self.step, 0, 0), [0], [1], "x"))

    def backward(self) -> list[Any]:
        return self.gather(self.send("backward", "backward", (self.step, 0, 0), "dy"))

    def step_experts(self) -> None:
        """The optimizer step, fire and forget (its results are waited for with the next calls)."""
        self._pending += self.send("step", "optimizer", self.step, 0)
        self.step += 1
        self.supervisor.after_step(self)

    def train_step(self) -> None:
        self.forward()
        self.backward()
        self.step_experts()
