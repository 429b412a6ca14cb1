"""Failures and goodput: what a constant stream of component failures costs a synchronous job.

**Job failure rate.** Components fail independently with exponential lifetimes, so rates add:
``lambda_job = units / MTBF_unit + nodes / MTBF_node + units / MTBF_link`` and ``MTBF_job = 1 / lambda``.
At 1,000,000 units of 50,000 h each, the job loses a unit every 3 minutes.

**Expected time of a segment.** Work of ``tau`` seconds followed by a checkpoint of ``C`` seconds,
failures at rate ``lambda``, each costing a restart of ``R`` seconds before the segment is redone from
its start (Daly 2006, exact for exponential failures):

    E[T] = exp(lambda R) / lambda * (exp(lambda (tau + C)) - 1)          goodput = tau / E[T]

**Global checkpoints** write every unit's state to durable storage at the Young/Daly interval
``tau = sqrt(2 C MTBF_job)``; a failure restarts the whole job (``restart_s``: reschedule, reload ``C``
worth of state, rebuild communicators) and redoes the work since the last checkpoint.

**Trickle checkpoints with local recovery** (the seed's design, ``zetta_ray.checkpoint``): after every
``snapshot_every`` steps each unit streams its expert and optimizer state to a memory pool on another
node, over the NIC time the step leaves free; only what does not fit is exposed. A failure is repaired
locally: detect it, swap in a spare unit, restore the failed unit's state from the pool, replay the
steps since its snapshot. Nobody else reloads anything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from zetta_ray.errors import ConfigError

__all__ = ["FailureSpec", "Goodput", "goodput_global", "goodput_trickle", "job_mtbf_s", "young_daly_interval"]

HOUR = 3600.0


@dataclass(kw_only=True, slots=True, frozen=True)
class FailureSpec:
    """Failure rates and recovery times. Only ``unit_mtbf_hours`` is required.

    ``node_mtbf_hours`` / ``link_mtbf_hours``: hosts (one per NVLink domain) and NICs/links (one per
    unit); None leaves them out. ``restart_s``: a global restart (reschedule, reload, re-init).
    ``detect_s`` + ``swap_s``: noticing a failure and bringing up a spare for local recovery.
    ``snapshot_every``: steps between trickle snapshots.
    """

    unit_mtbf_hours: float
    node_mtbf_hours: float | None = None
    link_mtbf_hours: float | None = None
    restart_s: float = 900.0
    detect_s: float = 10.0
    swap_s: float = 20.0
    snapshot_every: int = 1

    def __post_init__(self) -> None:
        for name in ("unit_mtbf_hours", "node_mtbf_hours", "link_mtbf_hours"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"failures.{name}={value!r} is invalid: must be > 0 hours")
        for name in ("restart_s", "detect_s", "swap_s"):
            value = getattr(self, name)
            if not value >= 0:
                raise ConfigError(f"failures.{name}={value!r} is invalid: must be >= 0 seconds")
        if not isinstance(self.snapshot_every, int) or self.snapshot_every < 1:
            raise ConfigError(f"failures.snapshot_every={self.snapshot_every!r} must be an integer >= 1")


@dataclass(kw_only=True, slots=True, frozen=True)
class Goodput:
    """Share of wall time spent on steps that count, and the figures behind it."""

    goodput: float
    interval_s: float
    checkpoint_s: float
    recovery_s: float

    def as_dict(self) -> dict[str, float]:
        return {
            "goodput": self.goodput,
            "interval_s": self.interval_s,
            "checkpoint_s": self.checkpoint_s,
            "recovery_s": self.recovery_s,
        }


def job_mtbf_s(f: FailureSpec, *, units: int, units_per_node: int) -> float:
    """Mean time between failures of a job on ``units`` units (seconds)."""
    rate = units / (f.unit_mtbf_hours * HOUR)
    if f.node_mtbf_hours is not None:
        rate += math.ceil(units / units_per_node) / (f.node_mtbf_hours * HOUR)
    if f.link_mtbf_hours is not None:
        rate += units / (f.link_mtbf_hours * HOUR)
    return 1.0 / rate


def young_daly_interval(checkpoint_s: float, mtbf_s: float) -> float:
    """The Young/Daly checkpoint interval ``sqrt(2 C M)`` (seconds of work between checkpoints)."""
    return math.sqrt(2.0 * checkpoint_s * mtbf_s)


def _segment_goodput(work_s: float, checkpoint_s: float, restart_s: float, mtbf_s: float) -> float:
    """``tau / E[T]`` for one segment (Daly's exact expectation), robust to huge exponents."""
    lam = 1.0 / mtbf_s
    exponent = lam * restart_s + lam * (work_s + checkpoint_s)
    if exponent > 700:  # exp would overflow: the job essentially never finishes a segment
        return 0.0
    expected = math.exp(lam * restart_s) / lam * math.expm1(lam * (work_s + checkpoint_s))
    return work_s / expected


def goodput_global(
    f: FailureSpec,
    *,
    mtbf_s: float,
    state_bytes: float,
    storage_bandwidth: float,
    unit_write_bandwidth: float,
    units: int,
) -> Goodput:
    """Global checkpoints to durable storage at the Young/Daly interval, whole-job restart on failure.

    The checkpoint takes the longer of the aggregate storage write (``state_bytes / storage_bandwidth``)
    and one unit writing its own shard over its link (``state_bytes / units / unit_write_bandwidth``).
    """
    checkpoint = max(state_bytes / storage_bandwidth, state_bytes / units / unit_write_bandwidth)
    interval = young_daly_interval(checkpoint, mtbf_s)
    restart = f.restart_s + checkpoint  # reading the state back costs about as much as writing it
    return Goodput(
        goodput=_segment_goodput(interval, checkpoint, restart, mtbf_s),
        interval_s=interval,
        checkpoint_s=checkpoint,
        recovery_s=restart,
    )


def goodput_trickle(
    f: FailureSpec,
    *,
    mtbf_s: float,
    step_s: float,
    unit_state_bytes: float,
    snapshot_bandwidth: float,
    free_link_s: float,
) -> Goodput:
    """Per-unit trickle snapshots to memory pools, local recovery onto a spare.

    ``free_link_s`` is the NIC time per step the training traffic leaves idle; snapshot bytes beyond it
    stall the step. Recovery restores one unit's state at ``snapshot_bandwidth`` (the slower of its
    link and the pool) and replays the interrupted snapshot interval, which the segment model counts.
    """
    interval = f.snapshot_every * step_s
    stream = unit_state_bytes / snapshot_bandwidth
    exposed = max(0.0, stream - f.snapshot_every * free_link_s)
    recovery = f.detect_s + f.swap_s + unit_state_bytes / snapshot_bandwidth
    return Goodput(
        goodput=_segment_goodput(interval, exposed, recovery, mtbf_s),
        interval_s=interval,
        checkpoint_s=exposed,
        recovery_s=recovery,
    )
