"""Fault injection for training: kill a compute unit, a memory pool or a node at a chosen step and
phase, or at random at a given rate with a seed (``zr.chaos``).

A ``Chaos`` is called as ``chaos(dmodel, step, phase)`` before forward, before backward and after the
optimizer step of every step (``zetta_ray.trainer.train(chaos=...)`` does this; so can your own loop):

    monkey = zr.chaos.Chaos([zr.chaos.Kill(target="unit", step=3, phase="backward", index=1)])
    for step, (x, y) in enumerate(batches):
        opt.zero_grad(); monkey(dmodel, step, "forward")
        _, loss = dmodel(x, y); monkey(dmodel, step, "backward")
        loss.backward(); opt.step(); monkey(dmodel, step, "optimizer")

Faults are injected for real: the actor is killed through Ray (``ray.kill``), a node through the
``kill_node`` callable you give (``ray.cluster_utils.Cluster.remove_node`` in tests; on a real cluster,
whatever stops a machine). Exact-step faults are for deterministic tests; random ones for soak runs.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import ray

from zetta_ray.errors import ConfigError

__all__ = ["PHASES", "TARGETS", "Chaos", "Kill", "parse_kill"]

TARGETS = ("unit", "pool", "node")
PHASES = ("forward", "backward", "optimizer")


@dataclass(frozen=True, kw_only=True, slots=True)
class Kill:
    """Kill ``target`` number ``index`` at ``step`` and ``phase``. For a node: the node of unit ``index``."""

    target: str
    step: int
    phase: str = "forward"
    index: int = 0

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ConfigError(f"Kill(target={self.target!r}) is invalid: use one of {TARGETS}")
        if self.phase not in PHASES:
            raise ConfigError(f"Kill(phase={self.phase!r}) is invalid: use one of {PHASES}")
        if not isinstance(self.step, int) or self.step < 0:
            raise ConfigError(f"Kill(step={self.step!r}) is invalid: must be an integer >= 0")
        if not isinstance(self.index, int) or self.index < 0:
            raise ConfigError(f"Kill(index={self.index!r}) is invalid: must be an integer >= 0")


def parse_kill(text: str) -> Kill:
    """``TARGET:STEP[:PHASE[:INDEX]]``, e.g. ``unit:3:backward:1`` or ``pool:5``."""
    parts = text.split(":")
    if not 2 <= len(parts) <= 4:
        raise ConfigError(f"--kill {text!r}: write TARGET:STEP[:PHASE[:INDEX]], e.g. unit:3:backward:1")
    try:
        return Kill(
            target=parts[0],
            step=int(parts[1]),
            phase=parts[2] if len(parts) > 2 else "forward",
            index=int(parts[3]) if len(parts) > 3 else 0,
        )
    except ValueError as e:
        raise ConfigError(f"--kill {text!r}: {e}") from None


class Chaos:
    """Injects ``kills`` at their step and phase, and with probability ``rate`` at every (step, phase)
    a random kill of one of ``targets`` (drawn from ``random.Random(seed)``). ``injected`` lists what
    was done."""

    def __init__(
        self,
        kills: Sequence[Kill] = (),
        *,
        rate: float = 0.0,
        seed: int = 0,
        targets: Sequence[str] = ("unit",),
        kill_node: Callable[[str], Any] | None = None,
    ):
        if not 0.0 <= rate <= 1.0:
            raise ConfigError(f"Chaos(rate={rate!r}) is invalid: a probability per (step, phase), 0..1")
        bad = [t for t in targets if t not in TARGETS]
        if bad:
            raise ConfigError(f"Chaos(targets=...) has {bad}; use a subset of {TARGETS}")
        if kill_node is None and ("node" in targets and rate > 0 or any(k.target == "node" for k in kills)):
            raise ConfigError("node kills need Chaos(kill_node=callable(node_id)) to stop a machine")
        self.kills = list(kills)
        self.rate = rate
        self.targets = tuple(targets)
        self.kill_node = kill_node
        self._rng = random.Random(seed)
        self.injected: list[dict[str, Any]] = []

    def __call__(self, dmodel: Any, step: int, phase: str) -> None:
        due = [k for k in self.kills if (k.step, k.phase) == (step, phase)]
        if self.rate and self._rng.random() < self.rate:
            target = self._rng.choice(self.targets)
            count = len(dmodel._runtime.units) if target != "pool" else len(_live_pools(dmodel))
            due.append(Kill(target=target, step=step, phase=phase, index=self._rng.randrange(max(count, 1))))
        for kill in due:
            self.injected.append(
                {"target": kill.target, "step": step, "phase": phase, **self._kill(dmodel, kill)}
            )

    def _kill(self, dmodel: Any, kill: Kill) -> dict[str, Any]:
        if kill.target == "unit":
            ray.kill(dmodel._runtime.units[kill.index], no_restart=True)
            return {"unit": kill.index}
        if kill.target == "pool":
            pools = _live_pools(dmodel)
            if not pools:
                raise ConfigError("no MemoryPool to kill: checkpointing is off (checkpoint=False)")
            name, handle = pools[kill.index % len(pools)]
            ray.kill(handle, no_restart=True)
            return {"pool": name}
        node = next(p["node_id"] for p in dmodel.placement.values() if p["unit"] == kill.index)
        self.kill_node(node)
        return {"node": node}


def _live_pools(dmodel: Any) -> list[tuple[str, Any]]:
    faults = dmodel._faults
    if faults is None:
        return []
    return [(p, h) for p, h in sorted(faults.pools.items()) if p not in faults.dead_pools]
