"""When to snapshot and when to write a durable checkpoint: pure functions of the step and the clock.

The trickle scheduler calls ``decide`` once after every completed optimizer step. ``step`` counts
completed steps (the first step is 1; step 0 is the initial state, which the seed reproduces, so it is
never snapshotted). The clock is an argument (``time.monotonic()`` in the scheduler, a number in tests),
so every decision is reproducible and testable without sleeping.

Rules:

- **Snapshot** at every step divisible by ``every``.
- **Durable** only at a snapshot step (a durable checkpoint is made of that step's snapshots, which is
  what makes it consistent), and then when the step is divisible by ``durable_every``, or when
  ``durable_interval_s`` has passed since the last durable checkpoint (or the start of the run). Step
  triggers are deterministic: a resumed run writes at the same steps as an uninterrupted one. The time
  trigger is not, and it yields while an earlier durable write is still in flight (``busy``), so a slow
  store cannot pile up work; step triggers still fire and meet the flusher's bounded queue instead.
- Never twice for one step, and never without ``durable_uri``.
"""

from __future__ import annotations

from dataclasses import dataclass

from zetta_ray.checkpoint.config import TrickleCheckpoint
from zetta_ray.errors import ConfigError

__all__ = ["TrickleDecision", "TrickleState", "decide", "should_snapshot"]


@dataclass(frozen=True, slots=True)
class TrickleState:
    """What the policy remembers between steps: the last durable checkpoint's step and time.

    Start with ``TrickleState.start(step, now)`` (``step`` = the step the run starts or resumes from);
    after a durable checkpoint completes, replace it with ``state.after_durable(step, now)``.
    """

    last_durable_step: int
    last_durable_time: float

    @classmethod
    def start(cls, step: int, now: float) -> TrickleState:
        return cls(last_durable_step=step, last_durable_time=now)

    def after_durable(self, step: int, now: float) -> TrickleState:
        return TrickleState(last_durable_step=step, last_durable_time=now)


@dataclass(frozen=True, slots=True)
class TrickleDecision:
    """Whether to snapshot and whether to write a durable checkpoint after a step, and why."""

    snapshot: bool
    durable: bool
    reason: str


def should_snapshot(step: int, every: int) -> bool:
    """Whether completed step ``step`` (>= 1) is snapshotted when snapshotting every ``every`` steps."""
    _check_step(step)
    if every < 1:
        raise ConfigError(f"every={every} is invalid: must be >= 1")
    return step % every == 0


def decide(
    step: int, now: float, config: TrickleCheckpoint, state: TrickleState, *, busy: bool = False
) -> TrickleDecision:
    """The decision after completed step ``step`` at time ``now`` (seconds, same clock as ``state``).

    ``busy`` says whether an earlier durable write is still in flight.
    """
    if not should_snapshot(step, config.every):
        return TrickleDecision(
            False, False, f"no snapshot: step {step} is not a multiple of every={config.every}"
        )
    why = f"snapshot: step {step} is a multiple of every={config.every}"
    if config.durable_uri is None:
        return TrickleDecision(True, False, f"{why}; no durable checkpoint: durable_uri is None")
    if step <= state.last_durable_step:
        return TrickleDecision(
            True, False, f"{why}; no durable checkpoint: step {state.last_durable_step} already has one"
        )
    if config.durable_every is not None and step % config.durable_every == 0:
        return TrickleDecision(
            True, True, f"{why}; durable: step {step} is a multiple of durable_every={config.durable_every}"
        )
    if config.durable_interval_s is not None:
        elapsed = now - state.last_durable_time
        if elapsed >= config.durable_interval_s:
            if busy:
                return TrickleDecision(
                    True,
                    False,
                    f"{why}; durable deferred: {elapsed:.1f} s >= durable_interval_s="
                    f"{config.durable_interval_s:g} but the previous durable write is still in flight",
                )
            return TrickleDecision(
                True,
                True,
                f"{why}; durable: {elapsed:.1f} s since the last one >= durable_interval_s="
                f"{config.durable_interval_s:g}",
            )
    return TrickleDecision(True, False, f"{why}; no durable checkpoint due")


def _check_step(step: int) -> None:
    if not isinstance(step, int) or isinstance(step, bool) or step < 1:
        raise ConfigError(
            f"step={step!r} is invalid: the policy takes the number of completed steps, an integer >= 1"
        )
