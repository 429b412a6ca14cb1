"""``zetta-ray simulate SPEC.toml [--json]``: the simulator's report and JSON, its errors, the 10T plan."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from zetta_ray.cli import main

pytestmark = pytest.mark.unit

SIM = Path(__file__).resolve().parents[2] / "examples" / "sim"
SPEC_22B = (SIM / "korthikanti_22b_full.toml").read_text()
KEYS = ("step_time_s", "mfu", "tokens_per_s", "memory_per_unit_bytes")


def _spec(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "spec.toml"
    path.write_text(text)
    return path


def _json(capsys: pytest.CaptureFixture[str], spec: Path) -> dict:
    assert main(["simulate", str(spec), "--json"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out)  # the whole of stdout is one JSON object
    assert isinstance(result, dict)
    return result


def test_json_has_the_figures_and_no_goodput_without_failures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = _json(capsys, _spec(tmp_path, SPEC_22B))
    for key in KEYS:
        assert isinstance(result[key], float | int) and result[key] > 0, key
    assert 0 < result["mfu"] < 1
    assert "goodput" not in result


def test_failures_table_adds_goodput(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = _json(capsys, _spec(tmp_path, SPEC_22B + "\n[failures]\nunit_mtbf_hours = 50000\n"))
    assert 0 < result["goodput"] <= 1
    assert all(result[key] > 0 for key in KEYS)


def test_text_report_by_default(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", str(_spec(tmp_path, SPEC_22B))]) == 0
    out = capsys.readouterr().out
    assert out.startswith("zetta-ray simulate: ")
    assert "MFU" in out and "tp 8 x pp 1 x dp 1" in out


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (("heads = 64\n", "heads = 64\nhedas = 3\n"), "unknown key(s) ['hedas'] in [model]"),
        (("tp = 8\n", "tp = 4\n"), "tp x pp x dp = 4 x 1 x 1 = 4, but hardware.units = 8"),
    ],
    ids=["unknown-key", "impossible-mesh"],
)
def test_spec_errors_exit_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], edit: tuple[str, str], named: str
) -> None:
    assert edit[0] in SPEC_22B
    spec = _spec(tmp_path, SPEC_22B.replace(*edit))
    assert main(["simulate", str(spec), "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("zetta-ray simulate: error: ")
    assert named in captured.err
    assert captured.err.count("\n") == 1  # one line, no traceback


def test_missing_spec_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", str(tmp_path / "nope.toml")]) == 2
    assert "cannot read spec" in capsys.readouterr().err


def test_the_10t_example_plans_within_the_time_limit(capsys: pytest.CaptureFixture[str]) -> None:
    start = time.perf_counter()
    result = _json(capsys, SIM / "moe_10t.toml")
    assert time.perf_counter() - start <= 60.0
    assert result["model"]["total_params"] >= 10e12
    assert result["hardware"]["units"] == 1_000_000
    assert result["mesh"]["auto"]
    assert 0 < result["goodput"] <= 1 and all(result[key] > 0 for key in KEYS)
    assert result["memory_per_unit_bytes"] <= result["hardware"]["hbm_bytes_per_unit"]
