"""Durable checkpoints written by ``zr.parallelize`` itself (``TrickleCheckpoint(durable_uri=...)``): made
from the trickle snapshots, and a module that loads one continues bit for bit like the run that wrote it."""

from __future__ import annotations

import pytest
import torch

import zetta_ray as zr
from zetta_ray.checkpoint import DurableStore

# one torch thread here (one_thread), as in the units, so that both runs reduce in the same order
pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_cluster", "one_thread")]

DEGREE = 2


def _model(seed: int) -> zr.MoETransformer:
    torch.manual_seed(seed)
    cfg = zr.MoEConfig(
        vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_experts=4, top_k=2, d_ff=64, seq_len=16
    )
    return zr.MoETransformer(cfg)


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    data = [torch.randint(0, 64, (4, 17), generator=g) for _ in range(n)]
    return [(b[:, :-1], b[:, 1:]) for b in data]


def _train(dm, opt, batches, first: int, last: int, position: dict) -> None:
    for i in range(first, last):
        x, y = batches[i]
        position["next"] = i + 1  # what a loader's state() would say after handing out batch i
        opt.zero_grad()
        _, loss = dm(x, y)
        loss.backward()
        opt.step()


def test_scheduled_checkpoints_resume_bitwise_and_a_forced_one_is_written_once(tmp_path):
    uri = str(tmp_path / "ckpt")
    batches = _batches(9)
    ckpt = zr.TrickleCheckpoint(durable_uri=uri, durable_every=2, keep_last=3)
    position = {"next": 0}
    with zr.parallelize(_model(0), zr.ExpertParallel(degree=DEGREE), checkpoint=ckpt) as dm:
        dm.track_data_position(lambda: dict(position))
        opt = dm.optimizer(torch.optim.AdamW, lr=1e-2)
        _train(dm, opt, batches, 0, 9, position)
        expected = dm.state_dict()
        dm.faults.durable.flush()
        store = DurableStore(uri)
        assert store.steps() == [4, 6, 8], "every 2nd step, the last 3 kept"
        info = store.latest()
        assert sorted(info.parts) == ["dense", "unit-0000", "unit-0001"]
        assert info.meta["data_position"] == {"next": 8}
        assert dm.checkpoint() == 9 and dm.checkpoint() is None, "forced once, then this step has one"
        assert store.steps() == [6, 8, 9]

    # A new process would start from other weights; loading the checkpoint of step 8 and training the
    # 9th batch must give exactly the state the uninterrupted run had after 9 steps.
    other = zr.TrickleCheckpoint(durable_uri=str(tmp_path / "elsewhere"), durable_every=2)
    with zr.parallelize(_model(1), zr.ExpertParallel(degree=DEGREE), checkpoint=other) as dm:
        opt = dm.optimizer(torch.optim.AdamW, lr=1e-2)
        store = DurableStore(uri)
        store.prune()
        (tmp_path / "ckpt" / "step-000000009" / "COMPLETE").unlink()  # as if the job died writing it
        info = dm.load_checkpoint(uri)
        assert info.step == 8 and info.meta["data_position"] == {"next": 8} and dm.step == 8
        resumed = {"next": 8}
        _train(dm, opt, batches, info.meta["data_position"]["next"], 9, resumed)
        actual = dm.state_dict()
        assert actual.keys() == expected.keys()
        differ = [k for k in expected if not torch.equal(actual[k], expected[k])]
        assert not differ, f"tensors differ after resuming: {differ[:5]}"


def test_time_based_checkpoints_and_clear_errors(tmp_path):
    uri = str(tmp_path / "timed")
    ckpt = zr.TrickleCheckpoint(durable_uri=uri, durable_every=None, durable_interval_s=1e-3)
    position = {"next": 0}
    with zr.parallelize(_model(0), zr.ExpertParallel(degree=DEGREE), checkpoint=ckpt) as dm:
        with pytest.raises(RuntimeError, match="after optimizer"):
            dm.load_checkpoint()
        opt = dm.optimizer(torch.optim.AdamW, lr=1e-2)
        assert dm.load_checkpoint() is None, "nothing written yet"
        _train(dm, opt, _batches(4), 0, 4, position)
        dm.faults.durable.flush()
        written = dm.faults.durable.written
        # Each step is due by the clock, but one is skipped while the previous write is still in flight.
        assert written and written == sorted(set(written)) and set(written) <= {1, 2, 3, 4}
        assert DurableStore(uri).steps() == written[-3:]
    with zr.parallelize(_model(0), zr.ExpertParallel(degree=DEGREE), checkpoint=False) as dm:
        with pytest.raises(zr.errors.ConfigError, match="durable_uri"):
            dm.checkpoint()
        with pytest.raises(zr.errors.ConfigError, match="pass uri="):
            dm.optimizer(torch.optim.AdamW, lr=1e-2)
            dm.load_checkpoint()
