"""StageGroup: the controller's side of a pipeline's stages.

It starts one ``PipelineStageActor`` per stage (``actors/pipeline_stage.py``), each with its contiguous
run of the model's layers, tells each its neighbours (activations and gradients go stage to stage,
never through this process), and sends a step's calls: the micro-batches to the first stage and their
targets to the last (straight into their inboxes), then one ``run`` per stage on its schedule; commit,
optimizer step and zero_grad after it. Calls return at once (``ActorGroup``).

With trickle snapshots on (``trickle``: MemoryPool actors it starts, on ``replicas`` nodes that hold no
stage where there are such nodes), every
stage hands its state to the pools itself after every ``every``-th optimizer step (``keep_snapshot``:
the bytes go stage to pool, never through this process), and from the construction on (step 0) each
call that changes a stage is journaled (``Entry``), with the micro-batches a run was fed, from the last
step whose snapshots every pool acknowledged (``base``) on. A dead or stalled stage is then rebuilt by
the group's supervisor (``control.stage_repair``): the whole pipeline goes back to ``base`` and the
journal is replayed, so the loop sees nothing. Without pools a stage that dies is a named
``UnitFailed`` / ``DeadlineExceeded`` at the next wait.
Touches Ray: actor start (``.remote``), ``ray.put`` of each stage's layers, ``ray.kill``; the pools
through ``unit_pools.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import ray
from torch import nn

from zetta_ray.actors.pipeline_stage import PipelineStageActor, schedule
from zetta_ray.checkpoint import TrickleCheckpoint
from zetta_ray.config import RuntimeConfig
from zetta_ray.experts.moe import MoELayer
from zetta_ray.runtime.calls import Call, read_quietly
from zetta_ray.runtime.groups import ActorGroup
from zetta_ray.runtime.replicas import Entry
from zetta_ray.runtime.unit_pools import start_pools, unkept

__all__ = ["StageGroup"]

Parts = list[tuple[list[Any], dict[str, Any]]]  # a run's micro-batches, each ([x, y], {})


class StageGroup(ActorGroup):
    """``replicas`` pipelines of the stages ``layers``: stage ``s`` of replica ``d`` holds ``layers[s]``
    and is unit ``d * stages + s`` (its index in ``actors`` and in faults). Same-stage units of the
    replicas reduce their gradients at every optimizer step (data parallelism)."""

    def __init__(
        self,
        layers: Sequence[Sequence[nn.Module]],
        cfg: RuntimeConfig,
        options: list[dict[str, Any]],
        *,
        microbatches: int,
        kind: str = "1f1b",
        seed: int = 0,
        trickle: TrickleCheckpoint | None = None,
        avoid: set[str] | None = None,
        replicas: int = 1,
        bucket_bytes: int = 25 * 2**20,
        experts: dict[str, Any] | None = None,
    ):
        self.stages, self.replicas = len(layers), replicas
        super().__init__(self.stages * replicas, cfg, options)
        self.microbatches = microbatches
        self.schedules = [
            schedule(kind, self.stages, u % self.stages, microbatches) for u in range(self.world)
        ]
        self.pools: list[Any] = []
        self.every = trickle.every if trickle is not None else 1
        self.journal: list[Entry] = []  # calls since the snapshots of step ``base``
        self.feeds: dict[int, list[Parts]] = {}  # run -> each replica's micro-batches, for the journal
        self.base: int | None = None  # the newest step whose snapshots every stage has in a pool
        self.optimizer_args: tuple[Any, Any] | None = None  # (class, kwargs), for a replacement
        self.stale: list[Any] = []  # results of calls a recovery redid: read and dropped at settle
        self._layers = [ray.put(list(run)) for run in layers]  # kept for a replacement stage
        self._experts = experts  # the shared expert units' handles, layout and config, or None
        moe = [sum(isinstance(m, MoELayer) for layer in run for m in layer.modules()) for run in layers]
        self._first_layer = [sum(moe[:s]) for s in range(self.stages)]  # each stage's first MoE layer
        self.starts = [0] * self.world  # actors started per unit: its incarnation in expert save keys
        self._init = {
            "seed": seed,
            "threads": cfg.threads_per_unit,
            "deadline_s": cfg.deadline_s,
            "replicas": replicas,
            "bucket_bytes": bucket_bytes,
        }
        try:
            if trickle is not None:
                self.pools = start_pools(
                    avoid or set(), trickle.replicas, trickle.pool_bytes, cfg.start_deadline_s
                )
            self.actors = [self._start(u) for u in range(self.world)]
            self.wait(self.each("connect", "control", self.mesh()), start=True)
            if self.pools:
                self.snapshot(0)
                self.settle()
        except BaseException:
            self.close()
            raise

    def _start(self, u: int) -> Any:
        d, s = divmod(u, self.stages)
        incarnation, self.starts[u] = self.starts[u], self.starts[u] + 1
        experts = {**self._experts, "first_layer": self._first_layer[s]} if self._experts else None
        return PipelineStageActor.options(**self.options[u]).remote(
            s, self.stages, self._layers[s], replica=d, experts=experts, incarnation=incarnation, **self._init
        )

    def mesh(self) -> list[list[Any]]:
        """The stage actors by replica, then stage."""
        return [self.actors[d * self.stages : (d + 1) * self.stages] for d in range(self.replicas)]

    def last_stages(self) -> list[int]:
        """The unit of each replica's last stage, in replica order."""
        return [d * self.stages + self.stages - 1 for d in range(self.replicas)]

    # -- calls ---------------------------------------------------------------------------------------

    def submit(
        self, method: str, phase: str, *args: Any, per_stage: list[tuple[Any, ...]] | None = None
    ) -> list[Call]:
        """``method(*args)`` (or stage ``s``: ``method(*per_stage[s])``) on every stage, journaled when
        the group keeps snapshots; returns at once."""
        entry = Entry(method, phase, per_stage or [args] * self.world)
        entry.calls = [self.call(s, method, phase, *entry.args[s]) for s in range(self.world)]
        if self.pools:
            for c in entry.calls:
                c.logged = entry
            self.journal.append(entry)
        return entry.calls

    def feed(self, run: int, parts: list[Parts]) -> None:
        """The micro-batches of ``run`` (``parts[d]``: replica ``d``'s): inputs into each replica's first
        stage's inbox, targets into its last's."""
        for d, shard in enumerate(parts):
            first, last = self.actors[d * self.stages], self.actors[d * self.stages + self.stages - 1]
            for m, (args, _) in enumerate(shard):
                first.deliver.remote("act", run, m, args[0])
                last.deliver.remote("target", run, m, args[1])

    def run(self, run: int, parts: list[Parts], backward: bool) -> list[Call]:
        """Run ``run`` over each replica's micro-batches ``parts[d]`` (each ``([x, y], {})``): inputs to
        its first stage, targets to its last, then every stage's schedule. Returns the ``run`` calls
        by unit."""
        for args, kwargs in (part for shard in parts for part in shard):
            if kwargs or len(args) != 2:
                raise TypeError(
                    "a pipelined model is called as dmodel(x, y): the first layer takes x, the last "
                    f"layer takes the last stage's activations and y; got {len(args)} positional "
                    f"arguments and keywords {sorted(kwargs)}"
                )
        if self.pools:
            self.feeds[run] = parts
        self.feed(run, parts)
        per_unit = [(run, self.schedules[u], self.microbatches, backward) for u in range(self.world)]
        return self.submit("run", "forward", per_stage=per_unit)

    def snapshot(self, step: int) -> list[Call]:
        """Every stage hands its state after ``step`` optimizer steps to the pools (journaled)."""
        return self.submit("keep_snapshot", "snapshot", step, self.pools)

    def after_step(self, step: int) -> list[Call]:
        """The calls that follow optimizer step ``step``: its snapshots, every ``every`` steps."""
        return self.snapshot(step) if self.pools and step % self.every == 0 else []

    # -- the journal ---------------------------------------------------------------------------------

    def settle(self) -> None:
        """Wait for every journaled call; the newest snapshot that every stage got into a pool becomes
        ``base`` and the journal starts after it. A pool that fails to acknowledge is named in the log;
        a stage's snapshot counts when one pool holds it."""
        self._drop_stale()
        if not self.journal:
            return
        self.wait([c for entry in self.journal for c in entry.calls])
        newest = None
        for i, entry in enumerate(self.journal):
            if entry.method == "keep_snapshot" and self._held(entry):
                newest = i
        if newest is None:
            return
        step = self.journal[newest].args[0][0]
        self.journal = self.journal[newest + 1 :]
        runs = {e.args[0][0] for e in self.journal if e.method == "run"}
        self.feeds = {r: p for r, p in self.feeds.items() if r in runs}
        if self.base is not None and step > self.base:
            for s in range(self.stages):
                for pool in self.pools:
                    pool.drop_before.remote(f"stage-{s}", step)
        self.base = step

    def replay(self) -> None:
        """Send every journaled call again to every stage (restored to ``base``), each run with its
        micro-batches fed again; the journal's ``Call``s point at the new results, and the old results
        (an aborted run's error) are read later by ``settle``."""
        for entry in self.journal:
            if entry.method == "run":
                run = entry.args[0][0]
                self.feed(run, self.feeds[run])
            for call in entry.calls:
                self.stale.append(call.ref)
                self.resend(call)

    def _drop_stale(self) -> None:
        """Read the finished results of calls a recovery redid (an aborted run's ``RunAborted``), so that
        Ray does not report them as unhandled errors; the unfinished ones are read next time."""
        self.stale = read_quietly(self.stale, 0)

    def _held(self, entry: Entry) -> bool:
        """Whether a pool kept every stage's snapshot of ``entry`` (replicas but 0 send none)."""
        acks = self.wait(entry.calls)  # each stage's list of its pools' acknowledgement refs
        return not unkept(acks, self.cfg.deadline_s, f"the snapshot of step {entry.args[0][0]}")

    def restart(self, u: int) -> Any:
        """Kill unit ``u`` (if it still runs) and start a new one in its place; returns it."""
        ray.kill(self.actors[u], no_restart=True)
        self.actors[u] = self._start(u)
        return self.actors[u]

    def output(self, index: int) -> np.ndarray:
        """Output ``index`` of the last run: each replica's last stage's (micro-batches concatenated),
        concatenated in replica order."""
        calls = [self.call(u, "output", "forward", index) for u in self.last_stages()]
        return np.concatenate(self.wait(calls), axis=0)

    def close(self) -> None:
        super().close()
        for pool in self.pools:
            ray.kill(pool, no_restart=True)
        self.pools = []
