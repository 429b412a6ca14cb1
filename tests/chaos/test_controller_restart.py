"""The controller itself dies (SIGKILL of the `zetta-ray train` process) after a durable checkpoint;
`zetta-ray train --resume` continues from it at the exact data position, and the final state is bit for
bit that of an uninterrupted run. Also: a corrupted newest checkpoint is detected by its hash and the
previous good one is used."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import ray
from helpers import TINY_RUN_STEPS, TINY_RUN_TOML, complete_steps, zetta_ray_command

pytestmark = pytest.mark.chaos

STEPS = TINY_RUN_STEPS


@pytest.fixture(scope="module")
def setup(ray_cluster: None, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    root = tmp_path_factory.mktemp("restart")
    (root / "run.toml").write_text(TINY_RUN_TOML + f'data_dir = "{root / "corpus"}"\n')
    return ray.get_runtime_context().gcs_address, root


def _cli(address: str, root: Path, *extra: str) -> list[str]:
    config = ["--config", str(root / "run.toml"), "--steps", str(STEPS), "--address", address]
    return zetta_ray_command("train", *config, *extra)


def _run(args: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(args, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_controller_killed_then_resumed_is_bitwise_identical(setup):
    address, root = setup
    _run(_cli(address, root, "--metrics-json", str(root / "full.json")))
    full = json.loads((root / "full.json").read_text())

    ckpt = root / "ckpt"
    args = _cli(address, root, "--checkpoint-dir", str(ckpt), "--checkpoint-every", "2")
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while not [s for s in complete_steps(ckpt) if s >= 4]:
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "no checkpoint at step >= 4 in time"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # the controller dies mid-run
    proc.wait(timeout=30)
    killed_at = max(complete_steps(ckpt))
    assert killed_at < STEPS

    _run(args + ["--resume", "--metrics-json", str(root / "resumed.json")])
    resumed = json.loads((root / "resumed.json").read_text())
    assert resumed["resumed_from"] >= killed_at
    assert resumed["state_sha256"] == full["state_sha256"]
    tail = {s["step"]: s["loss"] for s in full["steps"]}
    for s in resumed["steps"]:
        assert s["loss"] == tail[s["step"]]  # the same data, the same losses


def test_corrupted_newest_checkpoint_falls_back_to_the_previous(setup):
    address, root = setup
    ckpt = root / "ckpt2"
    args = _cli(address, root, "--checkpoint-dir", str(ckpt), "--checkpoint-every", "5")
    _run(args)
    assert complete_steps(ckpt) == [5, 10]
    part = ckpt / "step-000000010" / "unit-0001.safetensors"  # expert state that came from a pool
    data = bytearray(part.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the newest checkpoint
    part.write_bytes(bytes(data))
    done = _run(args + ["--resume", "--metrics-json", str(root / "fallback.json")])
    fallback = json.loads((root / "fallback.json").read_text())
    assert fallback["resumed_from"] == 5  # the corrupted step-10 checkpoint was refused
    assert len(fallback["steps"]) == 5
    assert "unit-0001.safetensors" in done.stderr  # the bad file is named


def test_chaos_command_reports_faults_recoveries_and_identity(setup, capsys):
    from zetta_ray.cli import main

    _, root = setup
    out = root / "chaos.json"
    code = main(
        [
            "chaos",
            "--config",
            str(root / "run.toml"),
            "--steps",
            "6",
            "--kill",
            "unit:2:backward:1",
            "--kill",
            "pool:4:forward",
            "--json",
            str(out),
        ]
    )
    report = json.loads(out.read_text())
    assert code == 0, capsys.readouterr().out
    assert [f["target"] for f in report["faults_injected"]] == ["unit", "pool"]
    assert [r["unit"] for r in report["recoveries"]] == [1]
    assert report["steps_redone"]["max"] <= 1
    assert report["bitwise_identical"] and report["fault_free_sha256"] == report["chaos_sha256"]
    assert "IDENTICAL" in capsys.readouterr().out
