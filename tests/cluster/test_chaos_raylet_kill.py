"""Killing a node for real: ``zr.chaos.RayletKiller`` SIGKILLs a node's raylet from a task pinned to it,
as ``zetta-ray chaos --address`` does on a real cluster.

The cluster is a ``ray.cluster_utils.Cluster`` on this machine (a head node and three worker nodes of 2
npu each, health checks every 0.5 s): each worker node has its own raylet process, so a raylet SIGKILL
is a real node death (its actors die, the cluster declares it dead), but not a machine losing power or
network. The command's ``--address`` path is tested end to end on it: the fault-free and chaos runs,
the node fault recovered, and the same final state."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from zetta_ray.chaos import ClusterNodeKiller, RayletKiller
from zetta_ray.cli import main
from zetta_ray.errors import ConfigError

pytestmark = [pytest.mark.cluster, pytest.mark.chaos]

CONFIG = str(Path(__file__).with_name("chaos_small.toml"))


@ray.remote(num_cpus=0)
class _Resident:
    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()


def _alive() -> set[str]:
    return {n["NodeID"] for n in ray.nodes() if n["Alive"]}


def _wait_dead(node_id: str, timeout_s: float = 20.0) -> float:
    start = time.monotonic()
    while node_id in _alive():
        assert time.monotonic() - start < timeout_s, f"node {node_id} still alive after {timeout_s} s"
        time.sleep(0.1)
    return time.monotonic() - start


@pytest.fixture(scope="module")
def cluster(start_nodes):
    return start_nodes(3, units={"npu": 2}).cluster


def test_the_driver_node_is_never_killed(cluster):
    head = cluster.head_node.node_id
    for killer in (RayletKiller(), ClusterNodeKiller(cluster)):
        with pytest.raises(ConfigError, match="driver|head"):
            killer(head)
    assert head in _alive() and cluster.head_node.all_processes["raylet"][0].process.poll() is None


def test_raylet_sigkill_kills_a_worker_node(cluster):
    victim = sorted(cluster.worker_nodes, key=lambda n: n.node_id)[0]
    raylet = victim.all_processes["raylet"][0].process  # started by Cluster: a child of this process
    pinned = NodeAffinitySchedulingStrategy(victim.node_id, soft=False)
    resident = _Resident.options(scheduling_strategy=pinned).remote()
    assert ray.get(resident.node.remote(), timeout=60) == victim.node_id

    done = RayletKiller(timeout_s=30)(victim.node_id)

    assert done["raylet_pid"] == raylet.pid
    assert raylet.wait(timeout=10) == -signal.SIGKILL
    assert _wait_dead(victim.node_id) < 10  # fast health checks: about 1.5 s
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(resident.node.remote(), timeout=30)  # what ran on the node died with it
    assert cluster.head_node.node_id in _alive()


def test_chaos_address_sigkills_a_node_raylet_and_recovers_bitwise(cluster, tmp_path, capsys):
    out = tmp_path / "report.json"
    args = ["chaos", "--address", cluster.address, "--config", CONFIG, "--data-dir", str(tmp_path / "c")]
    code = main([*args, "--steps", "6", "--kill", "node:2:forward:1", "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    report = json.loads(out.read_text())
    [fault] = report["faults_injected"]
    assert fault["how"] == "SIGKILL of the node's raylet" and fault["unit"] == 1
    _wait_dead(fault["node"])
    recoveries = report["recoveries"]
    assert recoveries and {r["kind"] for r in recoveries} == {"node"} and 1 in {r["unit"] for r in recoveries}
    assert report["steps_redone"]["max"] <= 1
    assert report["bitwise_identical"] and report["chaos_sha256"] == report["fault_free_sha256"]
