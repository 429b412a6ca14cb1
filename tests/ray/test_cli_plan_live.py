"""``zetta-ray plan`` without ``--topology``: it plans against the live Ray cluster (ray.nodes())."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray

from zetta_ray.cli import main

pytestmark = pytest.mark.ray


def test_plan_on_the_live_cluster(
    ray_cluster: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_json = tmp_path / "plan.json"
    assert main(["plan", "--zipf", "1.0", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("zetta-ray plan: ray-cluster, ")
    assert " on 1 node, 1 rack, 1 pod; 1 memory pool" in out.splitlines()[0]
    assert "no snapshot replicas" in out  # one node: nowhere off-node for a replica
    assert "L0/E0" in out and "predicted step" in out

    doc = json.loads(out_json.read_text())
    node_id = ray.get_runtime_context().get_node_id()
    assert {row["node"] for row in doc["experts"]} == {node_id}
    assert doc["topology"]["kinds"]["cpu"]["units"] == ray.cluster_resources()["CPU"]
    assert len(doc["experts"]) == 2 * 8  # MoEConfig defaults: 2 layers x 8 experts
    assert doc["step_time_s"] <= doc["round_robin"]["step_time_s"]
