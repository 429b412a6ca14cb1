"""The spec format of issue 5: the exact example parses; unknown keys and impossible requests say why."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from zetta_ray.errors import ConfigError
from zetta_ray.sim.spec import DoesNotFitError, SpecError, load_spec, parse_spec
from zetta_ray.sim.validation import ROWS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

pytestmark = pytest.mark.unit

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "sim"

ISSUE_EXAMPLE = """
[model]
kind = "dense"        # or "moe"
layers = 96
hidden = 12288
heads = 96
seq_len = 2048
vocab = 51200
ffn_hidden = 49152    # optional, default 4 x hidden
[hardware]
preset = "dgx-a100-80gb"   # also "dgx-h100-80gb"; or give unit and tier fields explicitly
units = 64
[parallel]            # or: parallel = "auto"
tp = 8
pp = 8
dp = 1
ep = 1
virtual_stages = 1
micro_batch = 1
global_batch = 64
recompute = "full"    # "none", "selective" or "full"
sequence_parallel = false
[failures]            # optional
unit_mtbf_hours = 50000
"""


def _spec(text: str = ISSUE_EXAMPLE) -> dict:
    return tomllib.loads(text)


def test_the_issue_example_parses_into_validated_dataclasses() -> None:
    spec = parse_spec(_spec())
    assert spec.model.f == 49152 and spec.model.layers == 96
    assert spec.hardware.units == 64 and spec.hardware.peak_flops == 312e12
    assert spec.parallel is not None and (spec.parallel.tp, spec.parallel.pp) == (8, 8)
    assert spec.failures is not None and spec.failures.unit_mtbf_hours == 50000


def test_moe_keys_parse_for_an_moe_model() -> None:
    text = """
[model]
kind = "moe"
layers = 8
hidden = 2048
heads = 16
seq_len = 2048
vocab = 32000
n_experts = 64
top_k = 2
moe_every = 2
[hardware]
preset = "dgx-h100-80gb"
units = 64
[parallel]
tp = 8
pp = 2
dp = 4
ep = 32
global_batch = 64
"""
    spec = parse_spec(_spec(text))
    assert spec.model.moe_layers == 4 and spec.parallel.ep == 32
    assert spec.parallel.expert_dp_group.size == 1


def test_parallel_auto_leaves_the_mesh_to_the_search() -> None:
    text = 'parallel = "auto"\n' + ISSUE_EXAMPLE.split("[parallel]")[0] + "[search]\nglobal_batch = 128\n"
    spec = parse_spec(_spec(text))
    assert spec.auto and spec.search.global_batch == 128


@pytest.mark.parametrize(
    ("edit", "error", "fragment"),
    [
        (
            ("layers = 96", "layers = 96\nlayer_count = 3"),
            SpecError,
            r"unknown key\(s\) \['layer_count'\] in \[model\]",
        ),
        (("units = 64", "units = 64\nspeed = 3"), SpecError, r"unknown key\(s\) \['speed'\] in \[hardware\]"),
        (("tp = 8", "tp = 8\nfsdp = 2"), SpecError, r"\['fsdp'\] in \[parallel\]"),
        (("unit_mtbf_hours = 50000", "unit_mtbf = 5"), SpecError, r"\['unit_mtbf'\] in \[failures\]"),
        (
            ("units = 64", "units = 60"),
            ConfigError,
            r"tp x pp x dp = 8 x 8 x 1 = 64, but hardware.units = 60",
        ),
        (("ffn_hidden = 49152", "n_experts = 8"), SpecError, "are for kind = 'moe'"),
        (('preset = "dgx-a100-80gb"', 'preset = "tpu"'), ConfigError, "use one of"),
        (('recompute = "full"', 'recompute = "none"'), DoesNotFitError, r"needs .* GB .* has 80 GB"),
        (("layers = 96", "layers = 100"), ConfigError, "must divide model.layers"),
    ],
)
def test_bad_specs_are_rejected_with_the_reason(edit: tuple[str, str], error: type, fragment: str) -> None:
    with pytest.raises(error, match=fragment):
        parse_spec(_spec(ISSUE_EXAMPLE.replace(*edit, 1)))


def test_does_not_fit_is_a_config_error_that_names_the_levers() -> None:
    with pytest.raises(ConfigError) as info:
        parse_spec(_spec(ISSUE_EXAMPLE.replace('recompute = "full"', 'recompute = "none"')))
    assert isinstance(info.value, DoesNotFitError)
    assert "recompute" in str(info.value) and "activations" in str(info.value)


def test_explicit_unit_and_tier_figures_replace_a_preset() -> None:
    text = ISSUE_EXAMPLE.replace(
        'preset = "dgx-a100-80gb"   # also "dgx-h100-80gb"; or give unit and tier fields explicitly',
        'unit = { name = "npu", peak_tflops = { bf16 = 400 }, hbm_gb = 96, hbm_bandwidth_gb_s = 3000 }\n'
        "tiers = [\n"
        '  { name = "scale-up", domain_units = 8, bandwidth_gb_s = 400, latency_us = 2 },\n'
        '  { name = "optical", domain_units = 1000000, bandwidth_gb_s = 100, oversubscription = 2,'
        " optical = true },\n"
        "]",
    )
    spec = parse_spec(_spec(text))
    assert spec.hardware.unit.name == "npu" and spec.hardware.peak_flops == 400e12
    assert [t.name for t in spec.hardware.tiers] == ["scale-up", "optical"]
    assert spec.hardware.effective_bandwidth(1) == 50e9
    no_tiers = text.split("tiers = [")[0] + "units = 64\n[parallel]" + text.split("[parallel]")[1]
    with pytest.raises(SpecError, match="needs either preset"):
        parse_spec(_spec(no_tiers))


def test_missing_tables_and_bad_files_are_spec_errors(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"needs a \[hardware\] table"):
        parse_spec({"model": _spec()["model"]})
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\n")
    with pytest.raises(SpecError, match="not valid TOML"):
        load_spec(bad)
    with pytest.raises(SpecError, match="cannot read"):
        load_spec(tmp_path / "missing.toml")


@pytest.mark.parametrize(
    ("file", "row"),
    [
        ("korthikanti_22b_full", "korthikanti-22b-full"),
        ("korthikanti_22b_selective", "korthikanti-22b-selective-sp"),
        ("korthikanti_175b_full", "korthikanti-175b-full"),
        ("korthikanti_175b_selective", "korthikanti-175b-selective-sp"),
        ("narayanan_1t", "narayanan-1t"),
        ("mixtral_8x7b_h100", "megatron-core-mixtral-8x7b"),
    ],
)
def test_the_example_specs_are_the_validation_runs(file: str, row: str) -> None:
    spec = load_spec(EXAMPLES / f"{file}.toml")
    published = next(r for r in ROWS if r.name == row)
    assert spec.model == published.model
    assert spec.parallel == published.parallel
    assert spec.hardware.name == published.preset


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (("units = 64", 'units = "64"'), "hardware.units = '64' must be an integer"),
        (("units = 64", "units = 64.5"), "must be an integer"),
        (("unit_mtbf_hours = 50000", 'unit_mtbf_hours = "long"'), r"\[failures\] is incomplete or mistyped"),
        (("units = 64", "units = 64\ncore_oversubscription = true"), "must be a number"),
    ],
)
def test_values_of_the_wrong_type_are_spec_errors(edit: tuple[str, str], fragment: str) -> None:
    with pytest.raises(SpecError, match=fragment):
        parse_spec(_spec(ISSUE_EXAMPLE.replace(*edit, 1)))
