"""``zetta-ray train`` configuration: TOML tables onto the config dataclasses, strict keys, flag overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

import zetta_ray as zr
from zetta_ray.cli import build_parser, main
from zetta_ray.errors import ConfigError
from zetta_ray.runconfig import load_config

pytestmark = pytest.mark.unit

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "train.toml"


def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def test_no_file_gives_the_defaults() -> None:
    cfg = load_config()
    assert (cfg.model, cfg.train, cfg.runtime) == (zr.MoEConfig(), zr.TrainConfig(), zr.RuntimeConfig())


def test_tables_map_onto_the_configs(tmp_path: Path) -> None:
    path = _toml(
        tmp_path,
        "[model]\nd_model = 64\nn_experts = 4\ncapacity_factor = 2\n"
        '[train]\nsteps = 7\nlr = 1e-2\ndata_dir = "/tmp/x"\n'
        "[runtime]\ndeadline_s = 5\n",
    )
    cfg = load_config(path)
    assert cfg.model == zr.MoEConfig(d_model=64, n_experts=4, capacity_factor=2)
    assert cfg.train == zr.TrainConfig(steps=7, lr=1e-2, data_dir="/tmp/x")
    assert cfg.runtime == zr.RuntimeConfig(deadline_s=5)


def test_flags_override_the_file(tmp_path: Path) -> None:
    path = _toml(tmp_path, "[train]\nsteps = 7\nseed = 5\n")
    cfg = load_config(path, steps=3, seed=None, data_dir="/d")
    assert (cfg.train.steps, cfg.train.seed, cfg.train.data_dir) == (3, 5, "/d")
    args = build_parser().parse_args(["train", "--config", str(path), "--steps", "2", "--seed", "9"])
    assert load_config(args.config, steps=args.steps, seed=args.seed).train.steps == 2


def test_example_config_loads() -> None:
    cfg = load_config(EXAMPLE)
    assert cfg.train.expert_degree == 4 and cfg.model.n_experts == 8


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[modle]\nd_model = 64\n", r"unknown table\(s\) or top-level key\(s\) \['modle'\]"),
        ("steps = 3\n", r"\['steps'\]"),
        ("[train]\nstep = 3\nlrr = 1\n", r"unknown key\(s\) \['lrr', 'step'\] in \[train\]"),
        ("[model]\nd_model = '64'\n", r"\[model\] d_model = '64' is a str; MoEConfig.d_model takes int"),
        ("[train]\nlr = true\n", r"\[train\] lr = True is a bool; TrainConfig.lr takes float"),
        ("[runtime]\ndeadline_s = -1\n", r"RuntimeConfig.deadline_s=-1 is invalid"),
        ("[train\n", "is not valid TOML"),
    ],
)
def test_bad_files_are_rejected_naming_the_problem(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(_toml(tmp_path, text))


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read it"):
        load_config(tmp_path / "nope.toml")


def test_cli_reports_config_errors_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _toml(tmp_path, "[train]\nlrr = 1\n")
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"zetta-ray train: error: {_one_line_unknown_key()}"]
    assert main(["train", "--steps", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "TrainConfig.steps=0 is invalid" in err
    assert main(["train", "--pool-bytes", "0"]) == 2
    assert "TrainConfig.pool_bytes=0 is invalid" in capsys.readouterr().err


def test_resume_without_a_checkpoint_dir_is_refused_before_anything_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import ray

    corpus = tmp_path / "corpus"
    assert main(["train", "--resume", "--data-dir", str(corpus)]) == 2
    assert "--resume needs --checkpoint-dir" in capsys.readouterr().err
    assert not ray.is_initialized() and not corpus.exists()  # no cluster started, no corpus built


def _one_line_unknown_key() -> str:
    accepted = sorted(f.name for f in zr.TrainConfig.__dataclass_fields__.values())
    return f"unknown key(s) ['lrr'] in [train]; TrainConfig accepts {accepted}"


def test_a_subcommand_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([])
    assert exit_info.value.code == 2
    assert "COMMAND" in capsys.readouterr().err


def test_mesh_keys_of_the_train_table_are_checked_before_anything_starts(tmp_path):
    config = tmp_path / "mesh.toml"
    config.write_text("[train]\ndata_parallel = 2\npipeline_stages = 1\nbatch_size = 8\n")
    assert load_config(config, microbatches=None).train.data_parallel == 2
    assert load_config(config, data_parallel=4).train.data_parallel == 4  # the flag beats the file
    with pytest.raises(ConfigError, match="batch_size=6 .* 4 equal parts; use a multiple of 4"):
        zr.TrainConfig(batch_size=6, data_parallel=4)
    with pytest.raises(ConfigError, match="batch_size=8 .* 12 equal parts"):
        zr.TrainConfig(batch_size=8, data_parallel=2, pipeline_stages=3)  # 2 x the default 2 * 3
    with pytest.raises(ConfigError, match="checkpoint_dir=.* must be None with data_parallel > 1"):
        zr.TrainConfig(data_parallel=2, checkpoint_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="data_parallel"):
        zr.TrainConfig(data_parallel=0)


def test_chaos_kills_are_checked_against_the_replicas_then_the_expert_units() -> None:
    from zetta_ray.chaos import Kill
    from zetta_ray.chaos_run import check_kills

    replica = Kill(target="unit", step=1, phase="backward", index=1)
    check_kills([replica], 0.0, degree=2, replicas=2)  # units 0, 1: replicas; 2, 3: expert units
    check_kills([Kill(target="unit", step=1, phase="backward", index=3)], 0.0, degree=2, replicas=2)
    with pytest.raises(ConfigError, match="4 compute units \\(2 dense replicas, then 2 expert units\\)"):
        check_kills([Kill(target="unit", step=1, phase="backward", index=4)], 0.0, degree=2, replicas=2)
    check_kills([], 0.1, degree=2, replicas=2)  # random kills: replicas and expert units both recover
    with pytest.raises(ConfigError, match="2 compute units \\(expert_degree\\)"):
        check_kills([Kill(target="unit", step=1, phase="backward", index=2)], 0.0, degree=2)
