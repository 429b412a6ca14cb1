"""A multi-node Ray cluster on this machine, one per test module (``zr.chaos.local_cluster``).

A head node and two worker nodes of one CPU each. Health checks are fast (``zr.chaos.FAST_HEALTH_CHECKS``:
every 500 ms, dead after 3 misses), so a removed node is reported dead in about 1.5 s instead of 30 s.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import pytest
import ray
from ray.cluster_utils import Cluster

import zetta_ray as zr


@dataclass(frozen=True)
class MultiNode:
    """The running cluster, its head node id and its worker nodes (``ray._private.node.Node``)."""

    cluster: Cluster
    head: str
    workers: list

    def alive(self) -> set[str]:
        return {n["NodeID"] for n in ray.nodes() if n["Alive"]}

    def remove(self, worker, timeout_s: float = 30.0) -> None:
        """Remove a worker node and wait until the cluster reports it dead."""
        node_id = worker.node_id
        self.cluster.remove_node(worker)
        deadline = time.monotonic() + timeout_s
        while node_id in self.alive():
            if time.monotonic() > deadline:
                raise TimeoutError(f"node {node_id} still reported alive {timeout_s} s after remove_node")
            time.sleep(0.1)


@pytest.fixture(scope="module")
def ray_multinode():
    if ray.is_initialized():
        ray.shutdown()
    with zr.chaos.local_cluster(workers=2) as cluster:
        yield MultiNode(cluster, cluster.head_node.node_id, list(cluster.worker_nodes))
