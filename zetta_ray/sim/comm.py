"""Time and bytes-per-tier of collectives on a tiered network (hierarchical, bandwidth-bound).

A group of ``n`` units ``g`` apart has, inside one domain of tier ``k`` (``D_k`` units),
``c_k = clamp(D_k // g, 1, n)`` members (``c_{-1} = 1``). Collectives run hierarchically, the way
NCCL's tree/ring-per-NIC algorithms behave on fat-trees: at tier ``k`` the ``r_k = c_k / c_{k-1}``
sub-groups exchange ``1 / c_{k-1}`` of the data, so

    all-reduce      t = sum_k  2 (r_k - 1) / r_k * (B / c_{k-1}) / bw_k  +  2 (r_k - 1) lat_k
    reduce-scatter  and all-gather: half of that
    all-to-all      a unit holding ``B`` bytes for the group sends ``B (c_k - c_{k-1}) / n`` across tier k;
                    the NIC carries every byte beyond tier 0, and each tapered tier bounds what crosses
                    it: ``t = max(b_0 / bw_0, max_{k>=1} sum_{j>=k} b_j / bw_k) + lat``

where ``bw_k`` is the tier's per-unit bandwidth after its taper (``Hardware.effective_bandwidth``)
times the NCCL bus efficiency (scale-up for tier 0, scale-out beyond). Every function returns the time
and the bytes one unit sends across each tier, so the step model can report traffic per tier.
"""

from __future__ import annotations

from dataclasses import dataclass

from zetta_ray.sim.calibration import Efficiency
from zetta_ray.sim.hardware import Hardware, tier_of_span
from zetta_ray.sim.parallel import Group

__all__ = ["Comm", "all_gather", "all_reduce", "all_to_all", "p2p", "reduce_scatter"]


@dataclass(slots=True)
class Comm:
    """Seconds on the wire and bytes one unit sends across each tier (index = tier)."""

    time: float
    bytes_tier: list[float]

    @staticmethod
    def zero(n_tiers: int) -> Comm:
        return Comm(time=0.0, bytes_tier=[0.0] * n_tiers)

    def scaled(self, factor: float) -> Comm:
        return Comm(time=self.time * factor, bytes_tier=[b * factor for b in self.bytes_tier])

    def add(self, other: Comm) -> Comm:
        """In place: this plus ``other`` (sequential)."""
        self.time += other.time
        for k, b in enumerate(other.bytes_tier):
            self.bytes_tier[k] += b
        return self


def _bw(hw: Hardware, eff: Efficiency, k: int) -> float:
    return hw.effective_bandwidth(k) * (eff.scale_up if k == 0 else eff.scale_out)


def _members(hw: Hardware, group: Group) -> list[int]:
    """c_k for every tier: members of the group inside one domain of tier k."""
    return [min(group.size, max(1, hw.domain(k) // group.stride)) for k in range(len(hw.tiers))]


def _hierarchical(hw: Hardware, eff: Efficiency, group: Group, nbytes: float, passes: float) -> Comm:
    out = Comm.zero(len(hw.tiers))
    if group.size <= 1 or nbytes <= 0:
        return out
    inner = 1
    for k, c in enumerate(_members(hw, group)):
        r = c / inner
        if r > 1:
            moved = passes * (r - 1) / r * nbytes / inner
            out.bytes_tier[k] += moved
            out.time += moved / _bw(hw, eff, k) + passes * (r - 1) * hw.tiers[k].latency
        inner = c
    return out


def all_reduce(hw: Hardware, eff: Efficiency, group: Group, nbytes: float) -> Comm:
    """All-reduce of ``nbytes`` held by every member (reduce-scatter then all-gather)."""
    return _hierarchical(hw, eff, group, nbytes, passes=2.0)


def reduce_scatter(hw: Hardware, eff: Efficiency, group: Group, nbytes: float) -> Comm:
    """Reduce-scatter of an ``nbytes`` tensor (each member ends with ``1/n`` of it, reduced)."""
    return _hierarchical(hw, eff, group, nbytes, passes=1.0)


def all_gather(hw: Hardware, eff: Efficiency, group: Group, nbytes: float) -> Comm:
    """All-gather into an ``nbytes`` tensor (each member contributes ``1/n``)."""
    return _hierarchical(hw, eff, group, nbytes, passes=1.0)


def all_to_all(hw: Hardware, eff: Efficiency, group: Group, nbytes: float) -> Comm:
    """All-to-all where each member holds ``nbytes`` spread evenly over all ``n`` destinations."""
    n_tiers = len(hw.tiers)
    out = Comm.zero(n_tiers)
    if group.size <= 1 or nbytes <= 0:
        return out
    inner = 1
    outermost = 0
    for k, c in enumerate(_members(hw, group)):
        if c > inner:
            out.bytes_tier[k] = nbytes * (c - inner) / group.size
            outermost = k
        inner = c
    t = out.bytes_tier[0] / _bw(hw, eff, 0)
    for k in range(1, n_tiers):
        beyond = sum(out.bytes_tier[k:])
        if beyond > 0:
            t = max(t, beyond / _bw(hw, eff, k))
    out.time = t + 2 * hw.tiers[outermost].latency
    return out


def p2p(hw: Hardware, eff: Efficiency, distance: int, nbytes: float) -> Comm:
    """One transfer of ``nbytes`` between units ``distance`` apart in unit numbering."""
    out = Comm.zero(len(hw.tiers))
    if nbytes <= 0:
        return out
    k = tier_of_span(hw, distance + 1)
    out.bytes_tier[k] = nbytes
    out.time = nbytes / _bw(hw, eff, k) + hw.tiers[k].latency
    return out
