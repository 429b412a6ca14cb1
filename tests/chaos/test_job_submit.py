"""Whole-job restart under Ray's job server (what ``ray job submit -- zetta-ray train ...`` does): the
job's driver, which is the controller, is SIGKILLed after a durable checkpoint; a second job with
``--resume`` continues from it, and the final state is bit for bit that of an uninterrupted job. Nothing
of the killed job is left running."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import ray
from helpers import TINY_RUN_STEPS as STEPS
from helpers import TINY_RUN_TOML, complete_steps, zetta_ray_command
from ray.job_submission import JobStatus, JobSubmissionClient
from ray.util.placement_group import placement_group_table
from ray.util.state import list_actors

pytestmark = pytest.mark.chaos

ENDED = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED)


@pytest.fixture(scope="module")
def jobs(start_ray, tmp_path_factory: pytest.TempPathFactory):
    """A cluster with the dashboard (it hosts the job server), a client for it, and a run directory."""
    start_ray(include_dashboard=True)
    root = tmp_path_factory.mktemp("jobs")
    (root / "run.toml").write_text(TINY_RUN_TOML + f'data_dir = "{root / "corpus"}"\n')
    return JobSubmissionClient("http://" + ray._private.worker.get_dashboard_url()), root


def _submit(client: JobSubmissionClient, root: Path, *extra: str) -> str:
    command = zetta_ray_command("train", "--config", str(root / "run.toml"), "--steps", str(STEPS), *extra)
    return client.submit_job(entrypoint=" ".join(command))


def _wait(client: JobSubmissionClient, job: str, timeout_s: float = 240) -> JobStatus:
    deadline = time.monotonic() + timeout_s
    while (status := client.get_job_status(job)) not in ENDED:
        assert time.monotonic() < deadline, f"job {job} still {status} after {timeout_s} s"
        time.sleep(0.5)
    return status


def test_job_driver_killed_then_resumed_by_a_second_job_is_bitwise_identical(jobs):
    client, root = jobs
    full = _submit(client, root, "--metrics-json", str(root / "full.json"))
    assert _wait(client, full) == JobStatus.SUCCEEDED, client.get_job_logs(full)[-3000:]

    ckpt = root / "ckpt"
    checkpoints = ("--checkpoint-dir", str(ckpt), "--checkpoint-every", "2")
    killed = _submit(client, root, *checkpoints)
    deadline = time.monotonic() + 180
    while not [s for s in complete_steps(ckpt) if s >= 4]:
        assert client.get_job_status(killed) not in ENDED, client.get_job_logs(killed)[-3000:]
        assert time.monotonic() < deadline, "no checkpoint at step >= 4 in time"
        time.sleep(0.05)
    driver = client.get_job_info(killed).driver_info
    os.kill(int(driver.pid), signal.SIGKILL)  # the controller dies mid-run
    assert _wait(client, killed) == JobStatus.FAILED
    killed_at = max(complete_steps(ckpt))
    assert killed_at < STEPS

    resumed = _submit(client, root, *checkpoints, "--resume", "--metrics-json", str(root / "resumed.json"))
    assert _wait(client, resumed) == JobStatus.SUCCEEDED, client.get_job_logs(resumed)[-3000:]
    after = json.loads((root / "resumed.json").read_text())
    before = json.loads((root / "full.json").read_text())
    assert after["resumed_from"] >= killed_at
    assert after["state_sha256"] == before["state_sha256"]
    losses = {s["step"]: s["loss"] for s in before["steps"]}
    assert after["steps"] and all(s["loss"] == losses[s["step"]] for s in after["steps"])

    address = ray.get_runtime_context().gcs_address
    deadline = time.monotonic() + 30
    while True:  # the killed job's units and pools went with its driver, and its slice with them
        alive = list_actors(address=address, filters=[("state", "=", "ALIVE")])
        ours = [a for a in alive if a.class_name in ("ComputeUnit", "MemoryPool")]
        groups = [g for g in placement_group_table().values() if g["state"] != "REMOVED"]
        if not ours and not groups:
            break
        assert time.monotonic() < deadline, (ours, groups)
        time.sleep(0.5)
