"""Failure rates add; Young/Daly; goodput of global checkpoints against trickle checkpoints at scale."""

from __future__ import annotations

import math

import pytest

from zetta_ray.errors import ConfigError
from zetta_ray.sim.failures import (
    FailureSpec,
    goodput_global,
    goodput_trickle,
    job_mtbf_s,
    young_daly_interval,
)

pytestmark = pytest.mark.unit

F = FailureSpec(unit_mtbf_hours=50_000)


def test_failure_rates_of_components_add() -> None:
    assert job_mtbf_s(F, units=1_000_000, units_per_node=8) == pytest.approx(50_000 * 3600 / 1e6)
    both = FailureSpec(unit_mtbf_hours=50_000, node_mtbf_hours=100_000, link_mtbf_hours=200_000)
    rate = 1000 / 50_000 + 125 / 100_000 + 1000 / 200_000
    assert job_mtbf_s(both, units=1000, units_per_node=8) == pytest.approx(3600 / rate)


def test_young_daly_interval() -> None:
    assert young_daly_interval(60.0, 3600.0) == pytest.approx(math.sqrt(2 * 60 * 3600))


def _global(units: int) -> float:
    mtbf = job_mtbf_s(F, units=units, units_per_node=8)
    return goodput_global(
        F,
        mtbf_s=mtbf,
        state_bytes=1e9 * units,
        storage_bandwidth=10e12,
        unit_write_bandwidth=50e9,
        units=units,
    ).goodput


def _trickle(units: int) -> float:
    mtbf = job_mtbf_s(F, units=units, units_per_node=8)
    return goodput_trickle(
        F, mtbf_s=mtbf, step_s=2.0, unit_state_bytes=1e9, snapshot_bandwidth=50e9, free_link_s=1.0
    ).goodput


def test_goodput_falls_with_scale_and_trickle_recovery_holds_up_where_global_restarts_collapse() -> None:
    g = [_global(n) for n in (1_000, 100_000, 1_000_000)]
    t = [_trickle(n) for n in (1_000, 100_000, 1_000_000)]
    assert g[0] > g[1] > g[2] and t[0] > t[1] > t[2]
    assert g[0] > 0.95 and t[0] > 0.99
    assert g[2] < 0.05 < 0.5 < t[2]  # a million units: whole-job restarts every few minutes cannot keep up


def test_goodput_tends_to_one_without_failures_and_to_zero_with_constant_failures() -> None:
    rare = goodput_global(
        F, mtbf_s=1e12, state_bytes=1e12, storage_bandwidth=1e12, unit_write_bandwidth=1e9, units=1
    )
    assert rare.goodput == pytest.approx(1.0, abs=1e-3)
    hopeless = goodput_global(
        F, mtbf_s=1.0, state_bytes=1e12, storage_bandwidth=1e9, unit_write_bandwidth=1e9, units=1
    )
    assert hopeless.goodput == 0.0


def test_snapshots_that_fit_in_idle_link_time_cost_nothing() -> None:
    free = goodput_trickle(
        F, mtbf_s=1e12, step_s=2.0, unit_state_bytes=1e9, snapshot_bandwidth=50e9, free_link_s=1.0
    )
    busy = goodput_trickle(
        F, mtbf_s=1e12, step_s=2.0, unit_state_bytes=1e9, snapshot_bandwidth=50e9, free_link_s=0.0
    )
    assert free.checkpoint_s == 0 and free.goodput == pytest.approx(1.0, abs=1e-6)
    assert busy.checkpoint_s == pytest.approx(0.02) and busy.goodput == pytest.approx(2.0 / 2.02, rel=1e-4)


def test_failure_spec_validation() -> None:
    with pytest.raises(ConfigError, match="unit_mtbf_hours"):
        FailureSpec(unit_mtbf_hours=0)
    with pytest.raises(ConfigError, match="snapshot_every"):
        FailureSpec(unit_mtbf_hours=1, snapshot_every=0)
