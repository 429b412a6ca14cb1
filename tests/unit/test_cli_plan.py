"""``zetta-ray plan --topology FILE``: the plan table, its JSON, determinism, the round-robin comparison,
the default replica rule and infeasible machines. No Ray: a synthetic machine needs no cluster."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from zetta_ray.cli import main
from zetta_ray.placement import Topology
from zetta_ray.placement.replicas import default_replicas

pytestmark = pytest.mark.unit

TOPOLOGIES = Path(__file__).resolve().parents[2] / "examples" / "topologies"
SKEWED = str(TOPOLOGIES / "three_tier_skewed.toml")
LAPTOP = str(TOPOLOGIES / "laptop.toml")
PLAN_KEYS = {
    "method",
    "seed",
    "topology",
    "cost",
    "dense",
    "experts",
    "workload",
    "link_tiers",
    "round_robin",
    "step_time_s",
    "speedup_vs_round_robin",
}


def _plan(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    status = main(["plan", *args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _plan_json(capsys: pytest.CaptureFixture[str], path: Path, *args: str) -> dict:
    status, _, err = _plan(capsys, *args, "--json", str(path))
    assert status == 0, err
    return json.loads(path.read_text())


def _nodes(tmp_path: Path, nodes: int, memory: str = "16GiB") -> str:
    spec = f"""name = "small"
[[nodes]]
count = {nodes}
units = [
  {{ kind = "npu", count = 2, flops = "100T", memory = "{memory}" }},
  {{ kind = "gpu", count = 1, flops = "200T", memory = "{memory}" }},
]
pools = [{{ memory = "64GiB", bandwidth = "10GB/s" }}]
"""
    path = tmp_path / f"nodes{nodes}.toml"
    path.write_text(spec)
    return str(path)


def test_prints_the_table_and_writes_the_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_json = tmp_path / "out" / "plan.json"
    status, out, err = _plan(capsys, "--topology", SKEWED, "--zipf", "1.0", "--json", str(out_json))
    assert status == 0, err
    assert out.startswith("zetta-ray plan: three-tier-skewed, 736 units (gpu 32, npu 704)")
    header = next(line for line in out.splitlines() if line.lstrip().startswith("expert"))
    for column in ("unit", "node", "load", "token rows/step", "snapshots/step"):
        assert column in header
    assert "L0/E0" in out and "L1/E7" in out
    assert "bytes per step by link tier" in out and "predicted step" in out and "round-robin" in out

    doc = json.loads(out_json.read_text())
    assert set(doc) >= PLAN_KEYS
    assert doc["topology"]["units"] == 736
    assert doc["workload"]["replicas"] == 2  # the default on a multi-rack machine
    assert len(doc["experts"]) == 2 * 8  # MoEConfig defaults: 2 layers x 8 experts
    row = doc["experts"][0]
    assert {"layer", "expert", "unit", "node", "load", "links"} <= set(row)
    assert {link["kind"] for link in row["links"]} == {"tokens", "snapshot"}
    assert sum(r["bandwidth_bytes_per_s"] is not None for r in doc["link_tiers"]) >= 1
    assert doc["step_time_s"] == doc["cost"]["step_time_s"]


def test_deterministic_for_a_seed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ("--topology", SKEWED, "--zipf", "1.2", "--seed", "3")
    first = _plan_json(capsys, tmp_path / "a.json", *args)
    again = _plan_json(capsys, tmp_path / "b.json", *args)
    assert (tmp_path / "a.json").read_text() == (tmp_path / "b.json").read_text()
    assert first["seed"] == 3 and first == again


@pytest.mark.parametrize("zipf", [None, "0.6", "1.2"])
def test_placer_beats_or_ties_round_robin(tmp_path: Path, capsys: pytest.CaptureFixture[str], zipf) -> None:
    args = ["--topology", SKEWED, "--tokens-per-step", "65536"] + (["--zipf", zipf] if zipf else [])
    doc = _plan_json(capsys, tmp_path / "plan.json", *args)
    assert doc["step_time_s"] <= doc["round_robin"]["step_time_s"]
    if zipf:  # uneven load on an uneven machine: strictly better
        assert doc["step_time_s"] < doc["round_robin"]["step_time_s"]
        assert doc["speedup_vs_round_robin"] > 1.0


def test_config_model_and_limit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "model.toml"
    config.write_text("[model]\nn_layers = 3\nn_experts = 16\nd_model = 64\n[train]\nbatch_size = 4\n")
    status, out, err = _plan(capsys, "--topology", SKEWED, "--config", str(config), "--limit", "5")
    assert status == 0, err
    assert "3 MoE layers x 16 experts" in out and "512 tokens/step" in out  # batch_size 4 x seq_len 128
    assert "5 of 48 experts shown" in out
    assert "L0/E4" in out and "L0/E5" not in out
    status, out, _ = _plan(capsys, "--topology", SKEWED, "--config", str(config), "--limit", "0")
    assert "L2/E15" in out and "experts shown" not in out


def test_default_replicas_follow_the_failure_domains(tmp_path: Path) -> None:
    assert default_replicas(Topology.from_file(LAPTOP)) == 0
    assert default_replicas(Topology.from_file(_nodes(tmp_path, 2))) == 1
    assert default_replicas(Topology.from_file(_nodes(tmp_path, 5))) == 2
    assert default_replicas(Topology.from_file(SKEWED)) == 2


def test_single_node_plans_with_no_replicas(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = _plan(capsys, "--topology", LAPTOP)
    assert status == 0, err
    assert "no snapshot replicas" in out and "NODE" in out


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (["--topology", LAPTOP, "--replicas", "1"], "a single-node machine needs replicas=0"),
        (["--tokens-per-step", "1000000"], "not enough unit memory"),
    ],
    ids=["replicas-on-one-node", "memory"],
)
def test_infeasible_plan_exits_1_with_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], reason: str
) -> None:
    if "--topology" not in args:
        args = ["--topology", _nodes(tmp_path, 3, memory="64MiB"), *args]
    status, out, err = _plan(capsys, *args)
    assert status == 1 and out == ""
    assert err.startswith("zetta-ray plan: error: InfeasiblePlacementError: ")
    assert reason in err and "--replicas" in err
    assert err.count("\n") == 1


def test_bad_input_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[model]\nn_expert = 4\n")
    status, _, err = _plan(capsys, "--topology", SKEWED, "--config", str(config))
    assert status == 2 and "n_expert" in err
    status, _, err = _plan(capsys, "--topology", str(tmp_path / "missing.toml"))
    assert status == 2 and "missing.toml" in err
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "--topology", SKEWED, "--address", "auto"])
    assert exit_info.value.code == 2
