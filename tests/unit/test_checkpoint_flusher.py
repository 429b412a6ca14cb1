"""AsyncFlusher: order, backpressure, errors surface on the next call, every wait has a deadline."""

from __future__ import annotations

import threading
import time

import pytest

from zetta_ray.checkpoint import AsyncFlusher, CheckpointError, FlushError, FlushTimeout
from zetta_ray.errors import ConfigError

pytestmark = [pytest.mark.unit, pytest.mark.timeout(20)]


def _failing(message: str):
    def job():
        raise OSError(message)

    return job


def test_jobs_run_in_order_and_flush_waits_for_them():
    done: list[int] = []
    with AsyncFlusher(max_pending=2) as flusher:
        for i in range(5):
            flusher.submit(lambda i=i: (time.sleep(0.01), done.append(i)), label=f"step {i}")
        flusher.flush(timeout=10)
        assert done == [0, 1, 2, 3, 4] and flusher.pending == 0


def test_background_error_surfaces_on_next_submit_once_and_later_jobs_still_run(caplog):
    ran: list[str] = []
    flusher = AsyncFlusher()
    flusher.submit(_failing("disk full"), label="step 100")
    flusher.submit(lambda: ran.append("step 200"), label="step 200")
    deadline = time.monotonic() + 10
    while flusher.pending and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(FlushError, match="'step 100'.*disk full") as info:
        flusher.submit(lambda: ran.append("rejected"), label="step 300")
    assert isinstance(info.value.__cause__, OSError) and info.value.failures[0][0] == "step 100"
    assert "disk full" in caplog.text
    flusher.submit(lambda: ran.append("step 300"), label="step 300")  # reported once, then cleared
    flusher.close(timeout=10)
    assert ran == ["step 200", "step 300"]


@pytest.mark.parametrize("call", ["flush", "close"])
def test_background_error_surfaces_on_flush_and_close(call):
    flusher = AsyncFlusher()
    flusher.submit(_failing("first"), label="a")
    flusher.submit(_failing("second"), label="b")
    with pytest.raises(FlushError, match=r"'a'.*first \(and 1 more\)") as info:
        getattr(flusher, call)(timeout=10)
    assert [label for label, _ in info.value.failures] == ["a", "b"]
    flusher.close(timeout=10)


def test_full_queue_and_stalled_store_time_out_instead_of_hanging():
    started, release = threading.Event(), threading.Event()
    flusher = AsyncFlusher(max_pending=1)
    flusher.submit(lambda: (started.set(), release.wait(10)), label="stalled write")
    assert started.wait(10)
    flusher.submit(lambda: None, label="queued")  # fills the one slot
    t0 = time.monotonic()
    with pytest.raises(FlushTimeout, match="no queue slot for 'third'.*'stalled write' running"):
        flusher.submit(lambda: None, label="third", timeout=0.2)
    with pytest.raises(FlushTimeout, match="still pending"):
        flusher.flush(timeout=0.2)
    with pytest.raises(FlushTimeout, match="close"):
        flusher.close(timeout=0.2)
    assert time.monotonic() - t0 < 5
    release.set()
    flusher.close(timeout=10)  # idempotent, and now drains
    assert flusher.pending == 0


def test_closed_flusher_refuses_work_and_waits_need_finite_deadlines():
    flusher = AsyncFlusher()
    flusher.close(timeout=5)
    with pytest.raises(CheckpointError, match="closed"):
        flusher.submit(lambda: None)
    with pytest.raises(ConfigError, match="deadline"):
        flusher.flush(timeout=float("inf"))
    with pytest.raises(ConfigError, match="max_pending"):
        AsyncFlusher(max_pending=0)
