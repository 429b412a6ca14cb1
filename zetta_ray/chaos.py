"""Fault injection for training: kill a compute unit, a memory pool or a node at a chosen step and
phase, or at random at a given rate with a seed (``zr.chaos``).

A ``Chaos`` is called as ``chaos(dmodel, step, phase)`` before forward, before backward and after the
optimizer step of every step (``zetta_ray.trainer.train(chaos=...)`` does this; so can your own loop):

    monkey = zr.chaos.Chaos([zr.chaos.Kill(target="unit", step=3, phase="backward", index=1)])
    for step, (x, y) in enumerate(batches):
        opt.zero_grad(); monkey(dmodel, step, "forward")
        _, loss = dmodel(x, y); monkey(dmodel, step, "backward")
        loss.backward(); opt.step(); monkey(dmodel, step, "optimizer")

Faults are injected for real. An actor is killed through Ray (``ray.kill``): unit ``Kill.index`` of
``dmodel.units`` (its actor from ``dmodel.unit_handle``), or a live pool of ``dmodel.pool_handles()``.
A node is killed by the ``kill_node`` callable you give, called with the node id of the unit
``Kill.index`` runs on now; two are here:

- ``RayletKiller()``: on any cluster. A task pinned to the node (``NodeAffinitySchedulingStrategy``,
  ``soft=False``) checks that its worker's parent process is the node's raylet and SIGKILLs it: every
  actor on the node dies at once, and the cluster learns of it only when the node's health checks fail,
  as with a machine that lost power.
- ``ClusterNodeKiller(cluster)``: on an in-process ``ray.cluster_utils.Cluster`` (``local_cluster``
  starts one with fast health checks), ``cluster.remove_node``.

The driver's own node (this process, the controller) is never killed: that is a controller failure,
which ``zetta-ray train --resume`` handles. Exact-step faults are for deterministic tests; random ones
for soak runs.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
from ray.cluster_utils import Cluster
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from zetta_ray.control.liveness import raylet_answers
from zetta_ray.errors import ConfigError, ZettaError

if TYPE_CHECKING:
    from zetta_ray.api.distributed import DistributedModule

__all__ = [
    "FAST_HEALTH_CHECKS",
    "PHASES",
    "TARGETS",
    "Chaos",
    "ClusterNodeKiller",
    "Kill",
    "RayletKiller",
    "local_cluster",
    "node_of_unit",
    "parse_kill",
]

TARGETS = ("unit", "pool", "node")
PHASES = ("forward", "backward", "optimizer")

#: Ray system config for a cluster whose node deaths should be noticed fast: a node that misses 3 health
#: checks 500 ms apart is declared dead (about 1.5 s instead of Ray's default of about 15 s).
FAST_HEALTH_CHECKS = {"health_check_period_ms": 500, "health_check_failure_threshold": 3}


@dataclass(frozen=True, kw_only=True, slots=True)
class Kill:
    """Kill ``target`` number ``index`` at ``step`` and ``phase``. For a node: the node of unit ``index``."""

    target: str
    step: int
    phase: str = "forward"
    index: int = 0

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ConfigError(f"Kill(target={self.target!r}) is invalid: use one of {TARGETS}")
        if self.phase not in PHASES:
            raise ConfigError(f"Kill(phase={self.phase!r}) is invalid: use one of {PHASES}")
        if not isinstance(self.step, int) or self.step < 0:
            raise ConfigError(f"Kill(step={self.step!r}) is invalid: must be an integer >= 0")
        if not isinstance(self.index, int) or self.index < 0:
            raise ConfigError(f"Kill(index={self.index!r}) is invalid: must be an integer >= 0")


def parse_kill(text: str) -> Kill:
    """``TARGET:STEP[:PHASE[:INDEX]]``, e.g. ``unit:3:backward:1``, ``pool:5`` or ``node:2:forward:0``."""
    parts = text.split(":")
    if not 2 <= len(parts) <= 4:
        raise ConfigError(f"--kill {text!r}: write TARGET:STEP[:PHASE[:INDEX]], e.g. unit:3:backward:1")
    try:
        return Kill(
            target=parts[0],
            step=int(parts[1]),
            phase=parts[2] if len(parts) > 2 else "forward",
            index=int(parts[3]) if len(parts) > 3 else 0,
        )
    except ValueError as e:
        raise ConfigError(f"--kill {text!r}: {e}") from None


class Chaos:
    """Injects ``kills`` at their step and phase, and with probability ``rate`` at every (step, phase)
    a random kill of one of ``targets`` (drawn from ``random.Random(seed)``). ``injected`` lists what
    was done and ``injected_at`` when (``time.perf_counter()``), in the same order.

    Node kills call ``kill_node(node_id)`` (see the module docstring); what it returns, if a dict, is
    added to the record, except ``"killed_at"``: the ``time.perf_counter()`` at which the kill was sent,
    when that is later than the call (``RayletKiller`` first finds the raylet). A random node kill picks
    among the units that are not on the driver's node.
    """

    def __init__(
        self,
        kills: Sequence[Kill] = (),
        *,
        rate: float = 0.0,
        seed: int = 0,
        targets: Sequence[str] = ("unit",),
        kill_node: Callable[[str], Any] | None = None,
    ):
        if not 0.0 <= rate <= 1.0:
            raise ConfigError(f"Chaos(rate={rate!r}) is invalid: a probability per (step, phase), 0..1")
        bad = [t for t in targets if t not in TARGETS]
        if bad:
            raise ConfigError(f"Chaos(targets=...) has {bad}; use a subset of {TARGETS}")
        if kill_node is None and ("node" in targets and rate > 0 or any(k.target == "node" for k in kills)):
            raise ConfigError(
                "node kills need Chaos(kill_node=callable(node_id)) to stop a machine: "
                "zr.chaos.RayletKiller() on any cluster, zr.chaos.ClusterNodeKiller(cluster) on a "
                "ray.cluster_utils.Cluster"
            )
        self.kills = list(kills)
        self.rate = rate
        self.targets = tuple(targets)
        self.kill_node = kill_node
        self._rng = random.Random(seed)
        self.injected: list[dict[str, Any]] = []
        self.injected_at: list[float] = []

    def __call__(self, dmodel: DistributedModule, step: int, phase: str) -> None:
        due = [k for k in self.kills if (k.step, k.phase) == (step, phase)]
        if self.rate and self._rng.random() < self.rate:
            kill = self._random_kill(dmodel, step, phase)
            if kill is not None:
                due.append(kill)
        for kill in due:
            at = time.perf_counter()
            done = self._kill(dmodel, kill)
            self.injected_at.append(done.pop("killed_at", at))
            self.injected.append({"target": kill.target, "step": step, "phase": phase, **done})

    def _random_kill(self, dmodel: DistributedModule, step: int, phase: str) -> Kill | None:
        target = self._rng.choice(self.targets)
        if target == "pool":
            choices = list(range(len(dmodel.pool_handles())))
        elif target == "node":
            driver = _driver_node()
            choices = [u.index for u in dmodel.units if u.node_id != driver]
        else:
            choices = list(range(len(dmodel.units)))
        if not choices:
            return None  # no pool left, or every unit shares the driver's node
        return Kill(target=target, step=step, phase=phase, index=self._rng.choice(choices))

    def _kill(self, dmodel: DistributedModule, kill: Kill) -> dict[str, Any]:
        units = len(dmodel.units)
        if kill.target in ("unit", "node") and kill.index >= units:
            raise ConfigError(
                f"Kill(target={kill.target!r}, index={kill.index}): there are {units} compute units; "
                f"use an index in 0..{units - 1}"
            )
        if kill.target == "unit":
            ray.kill(dmodel.unit_handle(kill.index), no_restart=True)
            return {"unit": kill.index}
        if kill.target == "pool":
            pools = list(dmodel.pool_handles().items())
            if not pools:
                raise ConfigError("no MemoryPool to kill: checkpointing is off (checkpoint=False)")
            name, handle = pools[kill.index % len(pools)]
            ray.kill(handle, no_restart=True)
            return {"pool": name}
        node = node_of_unit(dmodel, kill.index)
        if node == _driver_node():
            others = sorted({u.index for u in dmodel.units if u.node_id != node})
            raise ConfigError(
                f"Kill(target='node', index={kill.index}): unit {kill.index} runs on node {node}, the "
                "driver's own node; killing it would kill this controller, not test recovery. Pick the "
                f"index of a unit on another node ({others or 'none: add worker nodes'})"
            )
        done = self.kill_node(node)
        return {"node": node, "unit": kill.index, **(done if isinstance(done, dict) else {})}


def node_of_unit(dmodel: DistributedModule, unit: int) -> str:
    """The node compute unit ``unit`` runs on now (after a recovery: its replacement's node)."""
    return dmodel.units[unit].node_id


def _driver_node() -> str:
    return ray.get_runtime_context().get_node_id()


def _refuse_driver_node(node_id: str, how: str) -> None:
    if node_id == _driver_node():
        raise ConfigError(
            f"{how} will not kill node {node_id}: it is the driver's own node (this process). Kill a "
            "node that hosts compute units but not the driver"
        )


# -- node killers ------------------------------------------------------------------------------------------


def _is_raylet(exe: str) -> bool:
    return os.path.basename(exe) == "raylet"


@ray.remote(num_cpus=0, max_retries=0)
def _node_raylet(kill_pid: int | None = None) -> dict[str, Any]:
    """Runs on the node to kill: its worker's parent process (the raylet that started this worker) and,
    when ``kill_pid`` is that process and it is a raylet, SIGKILL it."""
    pid = os.getppid()
    try:
        exe = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    except OSError as e:
        exe = f"<cannot read /proc/{pid}/cmdline: {e.strerror}>"
    info = {"node_id": ray.get_runtime_context().get_node_id(), "pid": pid, "exe": exe, "killed": False}
    if kill_pid is not None and pid == kill_pid and _is_raylet(exe):
        os.kill(pid, signal.SIGKILL)
        info["killed"] = True
    return info


class RayletKiller:
    """Kills a node of the connected cluster for real: SIGKILL of the node's raylet, sent from a task
    pinned to that node (``NodeAffinitySchedulingStrategy(node_id, soft=False)``).

    A Ray worker's parent process is its node's raylet; a first task checks that (the parent's command
    is ``.../raylet``) and a second one, whose parent must be the same process, kills it. Every actor
    and worker on the node dies with the raylet; the cluster declares the node dead after its health
    checks fail (``FAST_HEALTH_CHECKS``: about 1.5 s; Ray's default: about 15 s). Each task has a
    ``timeout_s`` deadline; the second returns when the kill is confirmed: its reply, or the raylet
    refusing connections (its worker's death reaches us only with the cluster's verdict).
    """

    def __init__(self, timeout_s: float = 60.0):
        if not timeout_s > 0:
            raise ConfigError(f"RayletKiller(timeout_s={timeout_s!r}) is invalid: must be seconds > 0")
        self.timeout_s = timeout_s

    def __call__(self, node_id: str) -> dict[str, Any]:
        _refuse_driver_node(node_id, "RayletKiller")
        alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        if node_id not in alive:
            raise ConfigError(f"RayletKiller: node {node_id} is not alive (alive nodes: {sorted(alive)})")
        pinned = _node_raylet.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))
        info = self._get(pinned.remote(), node_id, "find the raylet")
        if info["node_id"] != node_id or not _is_raylet(info["exe"]):
            raise ZettaError(
                f"RayletKiller: on node {node_id} the task ran on node {info['node_id']} under parent "
                f"process {info['pid']} ({info['exe']!r}), not under a raylet, so there is no raylet to "
                "kill safely (a runtime_env or a custom worker launcher puts a process in between). Stop "
                "the machine another way and pass that as Chaos(kill_node=...)"
            )
        killed_at = time.perf_counter()
        try:
            done = self._confirm(pinned.remote(info["pid"]), node_id)
        except ray.exceptions.RayTaskError as e:  # the task itself raised: nothing was killed
            raise ZettaError(
                f"RayletKiller: sending SIGKILL to raylet process {info['pid']} on node {node_id} failed: "
                f"{e.cause!r}. The Ray workers must run as the raylet's user"
            ) from e
        except ray.exceptions.RayError:
            done = {"killed": True}  # the task's worker died with its raylet before it could answer
        if not done["killed"]:
            raise ZettaError(
                f"RayletKiller: node {node_id}'s raylet was process {info['pid']}, but the kill task ran "
                f"under process {done['pid']} ({done['exe']!r}); nothing was killed. Try again"
            )
        return {"how": "SIGKILL of the node's raylet", "raylet_pid": info["pid"], "killed_at": killed_at}

    def _confirm(self, ref: ray.ObjectRef, node_id: str) -> dict[str, Any]:
        """The kill task's reply, or ``{"killed": True}`` once the node's raylet refuses connections: the
        task's worker dies with its raylet, and Ray reports that only when the cluster declares the node
        dead (about 15 s with its default health checks), while the training should go on at once."""
        node = next(n for n in ray.nodes() if n["NodeID"] == node_id)
        deadline = time.monotonic() + self.timeout_s
        while not ray.wait([ref], timeout=0.2)[0]:
            if not raylet_answers(node):
                return {"killed": True}
            if time.monotonic() > deadline:
                return self._get(ref, node_id, "SIGKILL the raylet", timeout_s=0.0)  # raises, naming it
        return self._get(ref, node_id, "SIGKILL the raylet")

    def _get(
        self, ref: ray.ObjectRef, node_id: str, what: str, timeout_s: float | None = None
    ) -> dict[str, Any]:
        try:
            return ray.get(ref, timeout=self.timeout_s if timeout_s is None else timeout_s)
        except ray.exceptions.GetTimeoutError:
            ray.cancel(ref, force=True)
            raise ZettaError(
                f"RayletKiller: the task to {what} on node {node_id} did not finish within "
                f"{self.timeout_s:g} s (is the node overloaded, or are its health checks slower than "
                "that?); raise RayletKiller(timeout_s=...)"
            ) from None


class ClusterNodeKiller:
    """Kills a worker node of an in-process ``ray.cluster_utils.Cluster`` with ``cluster.remove_node``
    (SIGKILL of its processes unless ``graceful``). The head node, which runs the driver, is refused."""

    def __init__(self, cluster: Cluster, *, graceful: bool = False):
        self.cluster = cluster
        self.graceful = graceful

    def __call__(self, node_id: str) -> dict[str, Any]:
        head = self.cluster.head_node
        if head is not None and node_id == head.node_id:
            raise ConfigError(
                f"ClusterNodeKiller will not remove node {node_id}: it is the cluster's head node, where "
                "the driver runs. Kill a worker node"
            )
        _refuse_driver_node(node_id, "ClusterNodeKiller")
        workers = {n.node_id: n for n in self.cluster.worker_nodes}
        if node_id not in workers:
            raise ConfigError(
                f"ClusterNodeKiller: node {node_id} is not a live worker node of this cluster (its worker "
                f"nodes: {sorted(workers)})"
            )
        self.cluster.remove_node(workers[node_id], allow_graceful=self.graceful)
        return {"how": "graceful remove_node" if self.graceful else "remove_node (SIGKILL)"}


@contextmanager
def local_cluster(
    workers: int,
    *,
    units: dict[str, float] | None = None,
    cpus_per_worker: int = 1,
    system_config: dict[str, Any] | None = FAST_HEALTH_CHECKS,
    object_store_bytes: int | None = None,
) -> Iterator[Cluster]:
    """An in-process multi-node cluster, connected, and shut down on exit: a head node (the driver,
    no units) and ``workers`` worker nodes, each declaring ``units`` (e.g. ``{"npu": 2}``) as custom
    resources so that the slice's units go there. ``system_config`` is the head node's Ray
    ``_system_config``: ``FAST_HEALTH_CHECKS`` by default, ``None`` for Ray's own health checks (a
    killed node is declared dead after about 15 s). ``object_store_bytes``: each node's object store
    (``None``: ``ray.cluster_utils``' 150 MiB, which a test's small snapshots fit; a model of real size
    spills to disk there).

    Every node runs on this machine: it tests recovery from the death of a node's processes, not of
    its network or power.
    """
    if not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"local_cluster(workers={workers!r}) is invalid: must be an integer >= 1")
    if ray.is_initialized():
        raise ConfigError(
            "local_cluster starts its own cluster, but this process is already connected to one: call "
            "ray.shutdown() first, or kill nodes of the connected cluster with RayletKiller (--address)"
        )
    saved = os.environ.pop("RAY_ADDRESS", None)  # ray.init exports it; a stale one must not be joined
    system = dict(system_config or {})  # a copy: Ray adds its own keys to the config it is given
    store = {} if object_store_bytes is None else {"object_store_memory": object_store_bytes}
    try:
        cluster = Cluster(
            initialize_head=True,
            head_node_args={"num_cpus": 1, "include_dashboard": False, "_system_config": system, **store},
        )
        try:
            for _ in range(workers):
                cluster.add_node(num_cpus=cpus_per_worker, resources=dict(units or {}), **store)
            ray.init(address=cluster.address)
            cluster.wait_for_nodes(timeout=60)
            yield cluster
        finally:
            ray.shutdown()
            cluster.shutdown()
    finally:
        os.environ.pop("RAY_ADDRESS", None)
        if saved is not None:
            os.environ["RAY_ADDRESS"] = saved
