"""The one test harness: cluster fixtures, the one-thread fixture, and markers that follow directories.

Clusters, one per test module (``ray.init`` costs ~4 s, each torch actor ~1 s), each shut down when its
module ends:

- ``start_ray(**kwargs)``: a factory for a local single-node cluster, ``zr.init(num_cpus=2, **kwargs)``
  (``include_dashboard=True`` for the state API and the job server; ``units=...`` declares unit kinds,
  and the CPU count with them). ``ray_cluster`` is the plain one.
- ``start_nodes(workers, **kwargs)``: a factory for a multi-node cluster on this machine
  (``zr.chaos.local_cluster``: fast health checks unless ``system_config=None``), as a ``MultiNode``.
  ``ray_multinode`` is a head and two one-CPU workers.
- ``start_pools(nodes)``: MemoryPool actors pinned to the given nodes of the module's cluster, killed
  at the module's end.

Markers follow the directory and are checked at collection: tests/unit is ``unit`` (no Ray may start
there), tests/ray is ``ray``, tests/cluster is ``ray`` and ``cluster``, tests/chaos is ``ray`` and
``chaos``. A test that carries a marker its directory forbids fails collection, and a test in
tests/unit that leaves a cluster running fails (tests/unit/conftest.py), so ``pytest -m "not ray"``
selects exactly the tests that start no cluster.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import helpers
import pytest
import ray
from helpers import one_thread as _one_thread
from ray.cluster_utils import Cluster
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

import zetta_ray as zr

TESTS = Path(__file__).parent

#: directory -> (markers every test there gets, markers no test there may carry)
MARKERS_BY_DIRECTORY = {
    "unit": ({"unit"}, {"ray", "cluster", "chaos"}),
    "ray": ({"ray"}, {"unit"}),
    "cluster": ({"ray", "cluster"}, {"unit"}),
    "chaos": ({"ray", "chaos"}, {"unit"}),
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    wrong = []
    for item in items:
        directory = Path(item.fspath).relative_to(TESTS).parts[0]
        if directory not in MARKERS_BY_DIRECTORY:
            wrong.append(f"{item.nodeid}: tests live in one of {sorted(MARKERS_BY_DIRECTORY)}")
            continue
        given, forbidden = MARKERS_BY_DIRECTORY[directory]
        clash = sorted({m.name for m in item.iter_markers()} & forbidden)
        if clash:
            wrong.append(f"{item.nodeid}: marked {clash}, which tests/{directory} must not be")
        for name in sorted(given):
            item.add_marker(name)
    if wrong:
        raise pytest.UsageError("markers disagree with directories:\n" + "\n".join(wrong))


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Torch on one thread for the module (``helpers.one_thread``), as the units run."""
    with _one_thread():
        yield


def _disconnect() -> None:
    """Leave whatever cluster an earlier module left connected; forget its address. ``ray.init``
    exports ``RAY_ADDRESS`` for the driver, and after a shutdown it names a cluster that is gone."""
    if ray.is_initialized():
        ray.shutdown()
    os.environ.pop("RAY_ADDRESS", None)


@pytest.fixture(scope="module")
def start_ray() -> Iterator[Callable[..., None]]:
    """Factory: ``start_ray(**kwargs)`` starts this module's local cluster, ``zr.init(num_cpus=2,
    **kwargs)``; it is shut down when the module ends."""
    started = []

    def start(**kwargs: Any) -> None:
        if started:
            raise RuntimeError(f"this module started its cluster already ({started[0]}); one per module")
        _disconnect()
        if "units" not in kwargs:  # declared units name the CPU count themselves ("cpu")
            kwargs = {"num_cpus": 2, **kwargs}
        zr.init(**kwargs)
        started.append(kwargs)

    yield start
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_cluster(start_ray: Callable[..., None]) -> None:
    """A local single-node cluster of 2 CPUs for the module."""
    start_ray()


@pytest.fixture(scope="module")
def dense_cluster(start_ray: Callable[..., None]) -> Iterator[None]:
    """A local single-node cluster of 4 CPUs for the data- and pipeline-parallel tests, with the test
    helpers' models (``helpers.DenseLM``) pickled by value, as a script's classes are."""
    start_ray(num_cpus=4)
    ray.cloudpickle.register_pickle_by_value(helpers)
    yield
    ray.cloudpickle.unregister_pickle_by_value(helpers)


@dataclass(frozen=True)
class MultiNode:
    """A running multi-node cluster: its head node id and its worker nodes (``ray._private.node.Node``)."""

    cluster: Cluster
    head: str
    workers: list

    def alive(self) -> set[str]:
        return {n["NodeID"] for n in ray.nodes() if n["Alive"]}

    def remove(self, worker: Any, timeout_s: float = 30.0) -> None:
        """Remove a worker node and wait until the cluster reports it dead."""
        node_id = worker.node_id
        self.cluster.remove_node(worker)
        deadline = time.monotonic() + timeout_s
        while node_id in self.alive():
            if time.monotonic() > deadline:
                raise TimeoutError(f"node {node_id} still reported alive {timeout_s} s after remove_node")
            time.sleep(0.1)


@pytest.fixture(scope="module")
def start_nodes() -> Iterator[Callable[..., MultiNode]]:
    """Factory: ``start_nodes(workers, **kwargs)`` starts this module's multi-node cluster with
    ``zr.chaos.local_cluster(workers, **kwargs)`` (fast health checks by default: a removed node is
    reported dead in about 1.5 s); it is shut down when the module ends."""
    started: list[MultiNode] = []
    with ExitStack() as stack:

        def start(workers: int, **kwargs: Any) -> MultiNode:
            if started:
                raise RuntimeError("this module started its cluster already; one per module")
            _disconnect()
            cluster = stack.enter_context(zr.chaos.local_cluster(workers, **kwargs))
            started.append(MultiNode(cluster, cluster.head_node.node_id, list(cluster.worker_nodes)))
            return started[0]

        yield start


@pytest.fixture(scope="module")
def ray_multinode(start_nodes: Callable[..., MultiNode]) -> MultiNode:
    """A head node and two one-CPU worker nodes with fast health checks."""
    return start_nodes(2)


@pytest.fixture(scope="module")
def start_pools() -> Iterator[Callable[..., dict[str, Any]]]:
    """Factory: ``start_pools({name: node_id or None}, limit_bytes=2**26)`` starts MemoryPool actors
    (pinned to their node, or anywhere for None) on the module's cluster; they are killed when the
    module ends."""
    from zetta_ray.actors.memory_pool import MemoryPoolActor

    started: list[Any] = []

    def start(nodes: dict[str, str | None], limit_bytes: int = 2**26) -> dict[str, Any]:
        pools = {}
        for name, node in nodes.items():
            options = (
                {}
                if node is None
                else {"scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=False)}
            )
            pools[name] = MemoryPoolActor.options(**options).remote(limit_bytes=limit_bytes, name=name)
        started.extend(pools.values())
        return pools

    yield start
    if ray.is_initialized():
        for pool in started:
            ray.kill(pool)
