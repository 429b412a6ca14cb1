"""TrickleCheckpoint validation and the pure snapshot / durable-flush policy."""

from __future__ import annotations

from pathlib import Path

import pytest

from zetta_ray.checkpoint import TrickleCheckpoint, TrickleState, decide, should_snapshot
from zetta_ray.errors import ConfigError

pytestmark = pytest.mark.unit


def test_defaults_match_the_issue():
    c = TrickleCheckpoint()
    assert (c.every, c.replicas, c.durable_uri, c.durable_every, c.durable_interval_s, c.keep_last) == (
        1,
        2,
        None,
        100,
        None,
        3,
    )
    assert c.pool_bytes == 2 << 30
    assert not c.durable
    assert TrickleCheckpoint(durable_uri=Path("/tmp/ckpt")).durable_uri == "/tmp/ckpt"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every": 0}, r"every=0.*>= 1"),
        ({"full_every": 0}, r"full_every=0.*>= 1 \(1 = the full state in every snapshot"),
        ({"every": True}, r"every=True"),
        ({"replicas": 0}, r"replicas=0"),
        ({"durable_uri": " "}, r"durable_uri=' '"),
        ({"durable_every": 0}, r"durable_every=0"),
        ({"every": 4, "durable_every": 10}, r"multiple of every \(4\).*durable_every=12"),
        ({"durable_interval_s": -1.0}, r"durable_interval_s=-1.0"),
        ({"durable_every": None}, r"set at least one"),
        ({"keep_last": 0}, r"keep_last=0"),
        ({"pool_bytes": 0}, r"pool_bytes=0.*byte count > 0"),
        ({"pool_bytes": 1.5e9}, r"pool_bytes=1500000000.0"),
    ],
)
def test_invalid_config_names_field_value_and_fix(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        TrickleCheckpoint(**kwargs)


def test_config_is_keyword_only():
    with pytest.raises(TypeError):
        TrickleCheckpoint(1)  # type: ignore[misc]


def test_should_snapshot():
    assert [s for s in range(1, 13) if should_snapshot(s, 4)] == [4, 8, 12]
    assert all(should_snapshot(s, 1) for s in range(1, 5))
    with pytest.raises(ConfigError, match="step=0"):
        should_snapshot(0, 1)


def test_step_trigger_fires_at_multiples_and_only_on_snapshot_steps():
    c = TrickleCheckpoint(every=2, durable_uri="/ckpt", durable_every=4)
    state = TrickleState.start(step=0, now=0.0)
    decisions = {s: decide(s, float(s), c, state) for s in range(1, 9)}
    assert [s for s, d in decisions.items() if d.snapshot] == [2, 4, 6, 8]
    assert [s for s, d in decisions.items() if d.durable] == [4, 8]
    assert "durable_every=4" in decisions[4].reason
    assert "not a multiple of every=2" in decisions[3].reason


def test_no_durable_without_uri_and_never_twice_for_one_step():
    assert not decide(100, 0.0, TrickleCheckpoint(), TrickleState.start(0, 0.0)).durable
    c = TrickleCheckpoint(durable_uri="/ckpt", durable_every=10)
    after = TrickleState.start(0, 0.0).after_durable(10, 5.0)
    d = decide(10, 6.0, c, after)
    assert d.snapshot and not d.durable and "already has one" in d.reason


def test_resumed_run_flushes_at_the_same_steps():
    c = TrickleCheckpoint(durable_uri="/ckpt", durable_every=3)
    fresh = [s for s in range(1, 13) if decide(s, 0.0, c, TrickleState.start(0, 0.0)).durable]
    resumed = [s for s in range(7, 13) if decide(s, 0.0, c, TrickleState.start(6, 0.0)).durable]
    assert fresh == [3, 6, 9, 12] and resumed == [9, 12]


def test_time_trigger_and_busy_deferral():
    c = TrickleCheckpoint(durable_uri="s3://b/run", durable_every=None, durable_interval_s=10.0)
    state = TrickleState.start(step=0, now=100.0)
    assert not decide(1, 105.0, c, state).durable
    d = decide(2, 110.0, c, state)
    assert d.durable and "10.0 s since the last one" in d.reason
    deferred = decide(2, 111.0, c, state, busy=True)
    assert deferred.snapshot and not deferred.durable and "in flight" in deferred.reason
    state = state.after_durable(2, 111.0)
    assert not decide(3, 120.0, c, state).durable
    assert decide(4, 121.0, c, state).durable


def test_step_trigger_is_not_deferred_when_busy():
    c = TrickleCheckpoint(durable_uri="/ckpt", durable_every=5, durable_interval_s=1.0)
    assert decide(5, 0.0, c, TrickleState.start(0, 0.0), busy=True).durable
