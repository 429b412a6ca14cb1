"""``simulate`` end to end: keys later checks use, the 10T plan on a million units, the CLI text."""

from __future__ import annotations

import io
import json
import time
from dataclasses import replace
from pathlib import Path

import pytest

from zetta_ray.model_spec import ModelSpec
from zetta_ray.sim import main_simulate, render, simulate
from zetta_ray.sim.hardware import preset
from zetta_ray.sim.machine import topology_for
from zetta_ray.sim.memory import memory_per_unit
from zetta_ray.sim.parallel import ParallelSpec
from zetta_ray.sim.step import step

pytestmark = pytest.mark.unit

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "sim"


@pytest.fixture(scope="module")
def plan_10t() -> dict:
    started = time.perf_counter()
    result = simulate(EXAMPLES / "moe_10t.toml")
    result["_wall_s"] = time.perf_counter() - started
    return result


def test_the_10t_moe_is_planned_on_a_million_units_in_well_under_a_minute(plan_10t: dict) -> None:
    r = plan_10t
    assert r["_wall_s"] < 30
    assert r["model"]["total_params"] >= 10e12 and r["hardware"]["units"] == 1_000_000
    mesh = r["mesh"]
    assert mesh["auto"] and mesh["units_used"] + mesh["spare_units"] == 1_000_000
    assert mesh["units_used"] >= 900_000 and mesh["tp"] * mesh["pp"] * mesh["dp"] == mesh["units_used"]
    assert r["memory_per_unit_bytes"] <= 80e9
    for key in ("step_time_s", "mfu", "tokens_per_s", "goodput"):
        assert r[key] > 0
    assert 0 < r["mfu"] < 1 and 0 < r["goodput"] <= 1
    assert r["goodput"] > r["goodput_global_checkpoint"]
    assert r["optical"]["speedup"] >= 1.0
    place = r["placement"]
    assert place["units_per_group"] == mesh["ep"] and place["machine"]["units"] == mesh["units_used"]
    assert place["experts_per_unit_max"] == place["experts_per_unit_per_layer"]  # the memory cap holds
    assert place["replicas_off_node"] and place["group_spans"]["nodes"] >= mesh["ep"] // 8
    # the placement layer's cost model and the analytic model see the same layer within a factor of 2
    ratio = place["moe_layer_time_per_step_s"] / place["analytic_moe_layer_time_per_step_s"]
    assert 0.5 < ratio < 2.0
    assert [row["units"] for row in r["failures"]["scale"]] == [1_000, 100_000, 1_000_000]


def test_the_chosen_mesh_beats_its_neighbours(plan_10t: dict) -> None:
    mesh = plan_10t["mesh"]
    keys = ("tp", "pp", "dp", "ep", "virtual_stages", "micro_batch", "global_batch", "recompute")
    model = ModelSpec(
        kind="moe", layers=64, hidden=8192, heads=64, kv_heads=8, seq_len=4096, vocab=65536, ffn_hidden=6272,
        gated_mlp=True, flash_attention=True, n_experts=1024, top_k=4, expert_imbalance=1.1,
    )  # fmt: skip
    chosen = ParallelSpec(
        **{k: mesh[k] for k in keys},
        sequence_parallel=mesh["sequence_parallel"],
        zero1=True,
        overlap_comm=True,
    )
    hw = preset("dgx-h100-80gb", units=chosen.units)
    assert memory_per_unit(model, chosen).total == pytest.approx(plan_10t["memory_per_unit_bytes"])
    best = step(model, chosen, hw).step_time_s
    assert best == pytest.approx(plan_10t["step_time_s"], rel=0.3)  # the example adds a 4:1 core taper
    neighbours = [replace(chosen, recompute="full")]
    neighbours += [replace(chosen, virtual_stages=v) for v in (1, 2, 4) if v != chosen.virtual_stages]
    for other in neighbours:
        assert step(model, other, hw).step_time_s >= best


def test_a_dense_spec_gives_the_keys_and_no_goodput_without_failures() -> None:
    r = simulate(EXAMPLES / "korthikanti_175b_selective.toml")
    assert {"step_time_s", "mfu", "tokens_per_s", "memory_per_unit_bytes", "bytes_per_tier_per_unit"} <= set(
        r
    )
    assert "goodput" not in r and "placement" not in r
    assert r["mesh"]["auto"] is False


def test_render_gives_json_or_text_and_main_simulate_writes_it() -> None:
    path = EXAMPLES / "narayanan_1t.toml"
    data = json.loads(render(path, as_json=True))
    assert data["goodput"] > 0.9
    text = render(path)
    assert "MFU" in text and "goodput" in text
    out = io.StringIO()
    assert main_simulate(path, True, out) == 0
    assert json.loads(out.getvalue())["step_time_s"] == pytest.approx(data["step_time_s"])


def test_the_simulated_machine_is_a_placement_topology() -> None:
    hw = preset("dgx-h100-80gb", units=1_000_000)
    topo = topology_for(hw)
    assert topo.n_units == 1_000_000 and topo.n_nodes == 125_000
    assert topo.n_racks == 125_000 // 32 + 1  # 32 nodes per leaf, one partial rack
    assert topo.links.node.bandwidth == 450e9 and topo.links.rack.bandwidth == 50e9


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.toml")), ids=lambda p: p.stem)
def test_every_example_spec_simulates(path: Path) -> None:
    result = simulate(path, placement=False)
    assert result["step_time_s"] > 0 and 0 < result["mfu"] < 1
    assert result["memory_per_unit_bytes"] <= result["hardware"]["hbm_bytes_per_unit"]
