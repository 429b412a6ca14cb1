"""``zetta-ray chaos --nodes 2 --kill node:...``: the command starts its own cluster (a head node and two
worker nodes in this process), trains without and with a worker node removed mid-step, and reports the
node fault recovered with a final state equal to the fault-free run's. A node kill without several
nodes is refused before anything starts.

This module's one cluster is the one the command starts and shuts down itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray

from zetta_ray.cli import main

pytestmark = [pytest.mark.cluster, pytest.mark.chaos]

CONFIG = str(Path(__file__).with_name("chaos_small.toml"))


@pytest.fixture(scope="module")
def no_cluster():
    """The command must start the cluster: no connection and no RAY_ADDRESS left by other modules."""
    if ray.is_initialized():
        ray.shutdown()
    with pytest.MonkeyPatch.context() as env:
        env.delenv("RAY_ADDRESS", raising=False)
        yield


def _chaos(root: Path, *extra: str) -> list[str]:
    return ["chaos", "--config", CONFIG, "--data-dir", str(root / "corpus"), "--steps", "6", *extra]


def test_node_kill_on_an_embedded_single_node_cluster_is_refused(no_cluster, tmp_path, capsys):
    code = main(_chaos(tmp_path, "--kill", "node:2"))
    err = capsys.readouterr().err
    assert code == 2, err
    assert "--nodes N" in err and "--address" in err  # the fix is named
    assert not ray.is_initialized()  # refused before any cluster started


def test_node_kill_index_beyond_the_units_is_refused(no_cluster, tmp_path, capsys):
    code = main(_chaos(tmp_path, "--nodes", "2", "--kill", "node:2:forward:5"))
    err = capsys.readouterr().err
    assert code == 2 and "0..1" in err, err
    assert not ray.is_initialized()


def test_chaos_nodes_removes_a_worker_node_and_recovers_bitwise(no_cluster, tmp_path, capsys):
    out = tmp_path / "report.json"
    code = main(_chaos(tmp_path, "--nodes", "2", "--kill", "node:2:backward:0", "--json", str(out)))
    printed = capsys.readouterr().out
    assert code == 0, printed
    report = json.loads(out.read_text())
    [fault] = report["faults_injected"]
    assert (fault["target"], fault["step"], fault["phase"], fault["unit"]) == ("node", 2, "backward", 0)
    assert fault["how"] == "remove_node (SIGKILL)"
    recoveries = report["recoveries"]
    assert recoveries and {r["kind"] for r in recoveries} == {"node"}
    assert 0 in {r["unit"] for r in recoveries}
    assert all(r["node"] != fault["node"] for r in recoveries)  # replaced on a live node
    assert report["steps_redone"]["max"] <= 1
    assert report["kill_to_next_step_s"][0] is not None
    assert report["bitwise_identical"] and report["chaos_sha256"] == report["fault_free_sha256"]
    assert "IDENTICAL" in printed
    assert not ray.is_initialized()  # the command shut its cluster down


def test_chaos_kills_a_replica_and_a_shared_expert_unit_of_a_data_parallel_run_bitwise(
    no_cluster, tmp_path, capsys
):
    config = tmp_path / "dp.toml"
    config.write_text(Path(CONFIG).read_text().replace("[train]\n", "[train]\ndata_parallel = 2\n"))
    out = tmp_path / "report.json"
    args = ["chaos", "--config", str(config), "--data-dir", str(tmp_path / "corpus"), "--steps", "5"]
    code = main([*args, "--kill", "unit:1:backward:1", "--kill", "unit:3:forward:3", "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    report = json.loads(out.read_text())
    assert [(f["step"], f["unit"]) for f in report["faults_injected"]] == [(1, 1), (3, 3)]
    assert [(r["unit"], r["action"]) for r in report["recoveries"]] == [
        (1, "copying replica 0"),  # a replica (units 0, 1) rebuilt from its sibling
        (3, "rolling the expert units back"),  # an expert unit (units 2, 3) shared by both
    ]
    assert report["bitwise_identical"], printed
    ray.shutdown()  # the command ran on an embedded cluster, which it leaves to the process
