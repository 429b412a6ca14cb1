"""Collective costs on tiered networks: the textbook formulas on one tier, hierarchy and taper above."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zetta_ray.sim import comm
from zetta_ray.sim.calibration import CALIBRATED
from zetta_ray.sim.hardware import preset, with_core_taper
from zetta_ray.sim.parallel import Group

pytestmark = pytest.mark.unit

HW = preset("dgx-a100-80gb", units=4096)
EFF = CALIBRATED


def test_all_reduce_inside_one_nvlink_domain_is_the_ring_formula() -> None:
    n, nbytes = 8, 1e9
    out = comm.all_reduce(HW, EFF, Group(size=n, stride=1), nbytes)
    bw = 300e9 * EFF.scale_up
    assert out.time == pytest.approx(2 * (n - 1) / n * nbytes / bw + 2 * (n - 1) * 2e-6)
    assert out.bytes_tier[0] == pytest.approx(2 * (n - 1) / n * nbytes)
    assert sum(out.bytes_tier[1:]) == 0


def test_strided_groups_leave_the_node_and_contiguous_ones_reduce_inside_first() -> None:
    nbytes = 1e9
    strided = comm.all_reduce(HW, EFF, Group(size=16, stride=8), nbytes)  # data-parallel, tp = 8
    contiguous = comm.all_reduce(HW, EFF, Group(size=16, stride=1), nbytes)
    assert strided.bytes_tier[0] == 0 and strided.bytes_tier[1] == pytest.approx(2 * 15 / 16 * nbytes)
    # hierarchical: 8-way over NVLink, then 2-way over the NICs with an eighth of the data
    assert contiguous.bytes_tier[1] == pytest.approx(2 * 1 / 2 * nbytes / 8)
    assert contiguous.time < strided.time


def test_reduce_scatter_and_all_gather_are_half_an_all_reduce() -> None:
    g = Group(size=64, stride=8)
    ar = comm.all_reduce(HW, EFF, g, 1e9)
    assert comm.reduce_scatter(HW, EFF, g, 1e9).time == pytest.approx(ar.time / 2)
    assert comm.all_gather(HW, EFF, g, 1e9).time == pytest.approx(ar.time / 2)


def test_all_to_all_spreads_bytes_over_tiers_by_where_the_peers_are() -> None:
    out = comm.all_to_all(HW, EFF, Group(size=320, stride=1), 320e6)  # two leaf domains of 160
    assert out.bytes_tier[0] == pytest.approx(320e6 * 7 / 320)
    assert out.bytes_tier[1] == pytest.approx(320e6 * (160 - 8) / 320)
    assert out.bytes_tier[2] == pytest.approx(320e6 * 160 / 320)
    assert sum(out.bytes_tier) == pytest.approx(320e6 * 319 / 320)


def test_a_tapered_core_slows_traffic_that_crosses_it_and_circuits_remove_the_taper() -> None:
    big = preset("dgx-h100-80gb", units=65536)
    tapered = with_core_taper(big, 4)
    g = Group(size=8192, stride=8)  # spans pods: crosses the core
    base = comm.all_to_all(big, EFF, g, 1e9).time
    slow = comm.all_to_all(tapered, EFF, g, 1e9).time
    fixed = comm.all_to_all(tapered.with_(optical_circuits=True), EFF, g, 1e9).time
    assert slow > 2 * base and fixed == pytest.approx(base)
    inside = Group(size=256, stride=1)  # one leaf: never reaches the core
    assert comm.all_to_all(tapered, EFF, inside, 1e9).time == comm.all_to_all(big, EFF, inside, 1e9).time


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(1, 4096),
    stride=st.sampled_from([1, 2, 8, 64]),
    nbytes=st.floats(1e3, 1e10),
    taper=st.floats(1.0, 8.0),
)
def test_costs_grow_with_bytes_and_taper_and_bytes_are_conserved(
    size: int, stride: int, nbytes: float, taper: float
) -> None:
    hw = preset("dgx-h100-80gb", units=1 << 20)
    tapered = with_core_taper(hw, taper)
    g = Group(size=size, stride=stride)
    for fn in (comm.all_reduce, comm.all_to_all, comm.all_gather):
        small, large = fn(hw, EFF, g, nbytes), fn(hw, EFF, g, 2 * nbytes)
        assert large.time >= small.time >= 0
        assert fn(tapered, EFF, g, nbytes).time >= small.time * (1 - 1e-12)
    a2a = comm.all_to_all(hw, EFF, g, nbytes)
    assert sum(a2a.bytes_tier) == pytest.approx(nbytes * (size - 1) / size, abs=1e-6 * nbytes)
