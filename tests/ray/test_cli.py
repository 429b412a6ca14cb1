"""``zetta-ray train`` end to end on a real (small) Ray cluster: the command, its metrics, the loop."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import ray
from helpers import zetta_ray_command

import zetta_ray as zr
from zetta_ray.trainer import StepMetrics, train

pytestmark = pytest.mark.ray

TINY_TOML = """
[model]
d_model = 32
n_layers = 1
n_heads = 2
n_experts = 4
d_ff = 64
seq_len = 32

[train]
steps = 100
batch_size = 8
lr = 1e-2
expert_degree = 2
corpus_bytes = 200_000
"""


@pytest.fixture(scope="module")
def address(ray_cluster: None) -> str:
    """The module's cluster (tests/ray/conftest.py), which the subprocess joins with --address."""
    return ray.get_runtime_context().gcs_address


def test_train_command_writes_metrics_and_the_loss_falls(address: str, tmp_path: Path) -> None:
    config = tmp_path / "tiny.toml"
    config.write_text(TINY_TOML)
    metrics = tmp_path / "out" / "metrics.json"
    args = ["train", "--config", str(config), "--steps", "25", "--seed", "1", "--address", address]
    args += ["--data-dir", str(tmp_path / "corpus"), "--metrics-json", str(metrics)]
    done = subprocess.run(zetta_ray_command(*args), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("trained 25 steps in "), done.stdout

    record = json.loads(metrics.read_text())
    assert record["config"]["train"]["steps"] == 25  # the flag beat the file's 100
    assert record["config"]["train"]["seed"] == 1
    assert record["config"]["model"]["d_model"] == 32
    steps = record["steps"]
    assert [s["step"] for s in steps] == list(range(25))
    assert all(s["step_time_s"] > 0 and s["tokens_per_s"] > 0 for s in steps)
    first, last = steps[0]["loss"], sum(s["loss"] for s in steps[-5:]) / 5
    assert first > 5.0  # about ln(256) = 5.55 at initialization
    assert last < first - 1.0, f"loss did not fall: first {first:.3f}, mean of last five {last:.3f}"
    assert math.isfinite(record["val_loss"])
    assert record["loader_state"]["step"] == 25


def test_train_function_is_deterministic(address: str, tmp_path: Path) -> None:
    model_cfg = zr.MoEConfig(d_model=32, n_layers=1, n_heads=2, n_experts=4, d_ff=64, seq_len=32)
    train_cfg = zr.TrainConfig(
        steps=4, batch_size=4, lr=1e-2, expert_degree=2, corpus_bytes=200_000, data_dir=str(tmp_path)
    )
    seen: list[StepMetrics] = []
    a = train(model_cfg, train_cfg, address=address, on_step=seen.append)
    b = train(model_cfg, train_cfg, address=address, val_batches=0)
    assert [m.loss for m in a.steps] == [m.loss for m in b.steps]
    assert seen == a.steps
    assert a.val_loss is not None and b.val_loss is None
    assert a.loader_state["step"] == 4
    assert "trained 4 steps" in a.summary()


def test_train_command_passes_pool_bytes_to_the_checkpointing(address: str, tmp_path: Path) -> None:
    """``--pool-bytes`` reaches the MemoryPools: a limit below the first snapshot fails at once, with
    exit code 1 and the fix named, instead of training."""
    config = tmp_path / "tiny.toml"
    config.write_text(TINY_TOML)
    args = ["train", "--config", str(config), "--steps", "2", "--address", address, "--pool-bytes", "1000"]
    args += ["--data-dir", str(tmp_path / "corpus")]
    done = subprocess.run(zetta_ray_command(*args), capture_output=True, text=True, timeout=180)
    assert done.returncode == 1, (done.stdout, done.stderr[-3000:])
    assert "step-0 snapshot does not fit" in done.stderr and "pool_bytes" in done.stderr, done.stderr[-3000:]


def test_train_command_runs_data_parallel_replicas_sharing_the_expert_units(
    address: str, tmp_path: Path
) -> None:
    config = tmp_path / "tiny.toml"
    config.write_text(TINY_TOML)
    metrics = tmp_path / "metrics.json"
    args = ["train", "--config", str(config), "--steps", "4", "--address", address, "--data-parallel", "2"]
    args += ["--data-dir", str(tmp_path / "corpus"), "--metrics-json", str(metrics)]
    done = subprocess.run(zetta_ray_command(*args), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 dense replicas" in done.stderr and "DataParallel(degree=2)" in done.stderr
    record = json.loads(metrics.read_text())
    assert record["config"]["train"]["data_parallel"] == 2
    assert len(record["steps"]) == 4 and all(math.isfinite(s["loss"]) for s in record["steps"])
    # pipeline stages of the MoE transformer (its aux loss does not flow stage to stage): refused by name
    args = ["train", "--config", str(config), "--steps", "2", "--address", address, "--pipeline-stages", "2"]
    args += ["--data-dir", str(tmp_path / "corpus")]
    done = subprocess.run(zetta_ray_command(*args), capture_output=True, text=True, timeout=180)
    assert done.returncode == 2, done.stderr  # a configuration error
    assert "MoETransformer does not say how to split into stages" in done.stderr, done.stderr
