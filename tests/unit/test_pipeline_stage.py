"""Pipeline stages (``zetta_ray/actors/pipeline_stage.py``) driven in one process, one thread per stage,
their activations and gradients handed to each other directly: schedules, equivalence, errors."""

from __future__ import annotations

import copy
import threading

import numpy as np
import pytest
import torch
from helpers import DenseLM, accumulate_reference, dense_batches

from zetta_ray.actors.pipeline_stage import PipelineStage, schedule
from zetta_ray.api.pipeline_parallel import split_stages
from zetta_ray.errors import DeadlineExceeded, RunAborted

pytestmark = pytest.mark.usefixtures("one_thread")


def test_1f1b_fills_the_pipe_then_alternates_and_gpipe_runs_all_forwards_first():
    assert schedule("1f1b", 2, 0, 4) == [
        ("F", 0),
        ("F", 1),
        ("B", 0),
        ("F", 2),
        ("B", 1),
        ("F", 3),
        ("B", 2),
        ("B", 3),
    ]
    assert schedule("1f1b", 2, 1, 4) == [
        ("F", 0),
        ("B", 0),
        ("F", 1),
        ("B", 1),
        ("F", 2),
        ("B", 2),
        ("F", 3),
        ("B", 3),
    ]
    assert schedule("gpipe", 3, 1, 2) == [("F", 0), ("F", 1), ("B", 0), ("B", 1)]
    for stages in (1, 2, 4):
        for s in range(stages):
            for m in (1, 3, 8):
                ops = schedule("1f1b", stages, s, m)
                assert sorted(ops) == sorted([("F", i) for i in range(m)] + [("B", i) for i in range(m)])
                assert [i for k, i in ops if k == "B"] == list(range(m))  # backwards in micro-batch order
                held = max(sum(1 if k == "F" else -1 for k, _ in ops[: n + 1]) for n in range(len(ops)))
                assert held <= min(stages - s, m)  # 1F1B holds at most stages - s activations


def test_layers_split_into_contiguous_near_equal_stages():
    assert split_stages(4, 2) == [range(0, 2), range(2, 4)]
    assert split_stages(5, 3) == [range(0, 2), range(2, 4), range(4, 5)]


def _stages(stages: int, deadline_s: float = 10.0) -> list[PipelineStage]:
    layers = DenseLM(blocks=3).pipeline_layers()
    built: list[PipelineStage] = []

    def send(kind, to, run, m, array):
        built[to].deliver(kind, run, m, array)

    for s, run in enumerate(split_stages(len(layers), stages)):
        stage = PipelineStage(
            s, stages, [copy.deepcopy(layers[i]) for i in run], send=send, deadline_s=deadline_s
        )
        stage.set_optimizer(torch.optim.AdamW, {"lr": 1e-2})
        built.append(stage)
    return built


def _step(stages: list[PipelineStage], run: int, x, y, m: int, kind: str = "1f1b") -> list[float]:
    for i, (xs, ys) in enumerate(zip(x.chunk(m), y.chunk(m), strict=True)):
        stages[0].deliver("act", run, i, xs.numpy())
        stages[-1].deliver("target", run, i, ys.numpy())
    results: dict[int, dict] = {}

    def work(s: int) -> None:
        results[s] = stages[s].run(run, schedule(kind, len(stages), s, m), m)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(len(stages))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    for stage in stages:
        stage.commit(run)
        stage.step()
        stage.zero_grad()
    return results[len(stages) - 1]["losses"]


@pytest.mark.parametrize("kind", ["1f1b", "gpipe"])
def test_stages_equal_one_process_accumulating_the_micro_batches(kind):
    batches, m = dense_batches(3), 4
    stages = _stages(3)
    losses = [float(np.mean(_step(stages, r, x, y, m, kind))) for r, (x, y) in enumerate(batches)]
    ref_losses, ref_state = accumulate_reference(DenseLM(blocks=3), batches, world=m)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-4)
    got = {}
    for stage, run in zip(stages, split_stages(5, 3), strict=True):
        for key, value in stage.state_dict().items():
            j, name = key.split(".", 1)
            got[(run[int(j)], name)] = value
    for i, prefix in enumerate(["embed", "blocks.0", "blocks.1", "blocks.2", "head"]):
        for key, value in ref_state.items():
            if key.startswith(prefix + "."):
                np.testing.assert_allclose(
                    got[(i, key[len(prefix) + 1 :])], value.numpy(), rtol=1e-4, atol=1e-6
                )


def test_an_uncommitted_run_leaves_the_gradients_alone():
    stages = _stages(2)
    ((x, y),) = dense_batches(1)
    for i, (xs, ys) in enumerate(zip(x.chunk(2), y.chunk(2), strict=True)):
        stages[0].deliver("act", 1, i, xs.numpy())
        stages[1].deliver("target", 1, i, ys.numpy())
    t = threading.Thread(target=stages[0].run, args=(1, schedule("1f1b", 2, 0, 2), 2))
    t.start()
    stages[1].run(1, schedule("1f1b", 2, 1, 2), 2)
    t.join(timeout=30)
    assert all(p.grad is None for s in stages for p in s.params)
    stages[1].commit(1)
    assert all(p.grad is not None for p in stages[1].params)


def test_a_stage_waiting_for_its_neighbour_names_it_within_the_deadline():
    stages = _stages(2, deadline_s=0.3)
    with pytest.raises(DeadlineExceeded, match=r"pipeline act of micro-batch 0 \(from stage 0\)"):
        stages[1].run(1, schedule("1f1b", 2, 1, 2), 2)


def test_a_stage_restored_from_its_snapshot_redoes_a_step_bitwise():
    batches, m = dense_batches(3), 2
    stages = _stages(2)
    _step(stages, 0, *batches[0], m)
    snaps = [s.snapshot(1) for s in stages]
    _step(stages, 1, *batches[1], m)
    after = [s.state_dict() for s in stages]
    for stage, snap in zip(stages, snaps, strict=True):  # back to step 1, then the same step again
        assert stage.restore(snap) == 1
        assert stage.steps_applied == 1
    _step(stages, 1, *batches[1], m)
    for stage, want in zip(stages, after, strict=True):
        assert all(np.array_equal(stage.state_dict()[k], v) for k, v in want.items())
    with pytest.raises(ValueError, match="stage 1 cannot restore the snapshot of stage 0"):
        stages[1].restore(snaps[0])
    fresh = PipelineStage(0, 2, DenseLM(blocks=3).pipeline_layers()[:3])
    with pytest.raises(ValueError, match="set_optimizer\\(AdamW"):
        fresh.restore(snaps[0])


def test_an_aborted_stage_stops_waiting_at_once_until_it_is_restored():
    stages = _stages(2, deadline_s=30.0)
    snap = stages[1].snapshot(0)
    failed: list[BaseException] = []

    def wait() -> None:
        try:
            stages[1].run(1, schedule("1f1b", 2, 1, 2), 2)
        except BaseException as e:  # noqa: BLE001 - the test checks which
            failed.append(e)

    t = threading.Thread(target=wait)
    t.start()
    stages[1].abort()
    t.join(timeout=5)
    assert not t.is_alive() and isinstance(failed[0], RunAborted), failed
    with pytest.raises(RunAborted):  # a run queued before the restore stops too
        stages[1].run(2, schedule("1f1b", 2, 1, 2), 2)
    stages[1].restore(snap)
    stages[1].deadline_s = 0.2
    with pytest.raises(DeadlineExceeded):  # restored: it waits for its neighbour again
        stages[1].run(3, schedule("1f1b", 2, 1, 2), 2)
