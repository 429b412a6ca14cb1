"""The training loop behind ``zetta-ray train``, as a function that tests and examples call too.

It is the loop a researcher would write with the public API, nothing more:

    zr.init(address)
    torch.manual_seed(seed)
    model = zr.MoETransformer(model_cfg)
    dmodel = zr.parallelize(model, zr.ExpertParallel(degree=E), runtime=runtime_cfg)
    # or, with TrainConfig.data_parallel = D: D dense replicas sharing the E expert units
    dmodel = zr.parallelize(model, zr.ExpertParallel(degree=E), zr.DataParallel(degree=D), ...)
    opt = dmodel.optimizer(torch.optim.AdamW, lr=..., weight_decay=...)
    for x, y in loader:
        opt.zero_grad(); logits, loss = dmodel(x, y); loss.backward(); opt.step()
    dmodel.close()

Data comes from ``zetta_ray.data``: the byte-level standard-library corpus (built once into
``TrainConfig.data_dir`` or the cache) and a deterministic loader seeded with ``TrainConfig.seed``.

Timing: the experts' optimizer step is fire-and-forget, so a step's wall time includes waiting for the
previous step's remote updates. Summed over steps it is the true training time; step 0 also pays for
warm-up (first calls into fresh actor processes).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

import zetta_ray as zr
from zetta_ray.config import MoEConfig, RuntimeConfig, TrainConfig
from zetta_ray.data import Corpus, CorpusSpec, LoaderState, TokenLoader, ensure_corpus

__all__ = ["StepMetrics", "TrainResult", "train"]


@dataclass(frozen=True, kw_only=True, slots=True)
class StepMetrics:
    """One optimizer step: ``loss`` is the model's training loss (cross-entropy plus auxiliary terms)."""

    step: int
    loss: float
    step_time_s: float
    tokens_per_s: float


@dataclass(kw_only=True, slots=True)
class TrainResult:
    """What a run produced: per-step metrics, the held-out loss, where the data came from and ended."""

    steps: list[StepMetrics]
    val_loss: float | None
    wall_time_s: float
    corpus_dir: str
    loader_state: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)
    state_sha256: str = ""  # of the final model state, tensors in key order: equal runs, equal hashes
    resumed_from: int | None = None  # the durable checkpoint's step, when the run resumed
    recoveries: list[dict[str, Any]] = field(default_factory=list)

    def last_losses_mean(self, n: int = 5) -> float:
        tail = self.steps[-n:]
        return sum(m.loss for m in tail) / len(tail)

    def summary(self) -> str:
        """One line: steps, time, first and final loss, validation loss, throughput."""
        n = len(self.steps)
        tokens = sum(m.tokens_per_s * m.step_time_s for m in self.steps)
        train_time = sum(m.step_time_s for m in self.steps)
        val = f", val loss {self.val_loss:.3f}" if self.val_loss is not None else ""
        return (
            f"trained {n} steps in {self.wall_time_s:.1f} s: loss {self.steps[0].loss:.3f} -> "
            f"{self.last_losses_mean():.3f} (mean of last {min(5, n)}){val}, "
            f"{tokens / max(train_time, 1e-9):,.0f} tokens/s"
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``{"config", "steps": [{step, loss, step_time_s, tokens_per_s}], "val_loss", ...}``."""
        return {
            "config": self.config,
            "steps": [asdict(m) for m in self.steps],
            "val_loss": self.val_loss,
            "wall_time_s": self.wall_time_s,
            "corpus_dir": self.corpus_dir,
            "loader_state": self.loader_state,
            "state_sha256": self.state_sha256,
            "resumed_from": self.resumed_from,
            "recoveries": self.recoveries,
        }


def train(
    model_cfg: MoEConfig,
    train_cfg: TrainConfig,
    runtime_cfg: RuntimeConfig | None = None,
    *,
    address: str | None = None,
    val_batches: int = 4,
    on_step: Callable[[StepMetrics], None] | None = None,
    log: Callable[[str], None] | None = None,
    resume: bool = False,
    chaos: Callable[[zr.DistributedModule, int, str], None] | None = None,
) -> TrainResult:
    """Train ``zr.MoETransformer(model_cfg)`` for ``train_cfg.steps`` steps; return the metrics.

    ``address`` goes to ``zr.init`` (``None``: ``RAY_ADDRESS`` or an embedded local cluster; an already
    connected process keeps its connection). ``on_step`` sees every step's metrics as it finishes (the
    CLI's progress bar); ``log`` receives a few status lines. After training, the mean loss over
    ``val_batches`` batches of the held-out shard is reported (``None`` if the corpus has none).

    With ``train_cfg.checkpoint_dir`` a durable checkpoint (full model state, both optimizers' state,
    the loader's position) is written every ``checkpoint_every`` steps and after the last, off the
    training thread; ``resume=True`` continues from the newest one that verifies, at the exact data
    position, so the continuation is bit-identical to an uninterrupted run. ``chaos(dmodel, step,
    phase)`` is called before forward, before backward and after the optimizer step of every step (the
    chaos tool injects faults there).
    """
    if resume and train_cfg.checkpoint_dir is None:  # before the corpus is built or Ray started
        raise zr.errors.ConfigError("--resume needs --checkpoint-dir (TrainConfig.checkpoint_dir)")
    runtime_cfg = runtime_cfg or RuntimeConfig()
    say = log or (lambda _msg: None)
    started = time.perf_counter()

    spec = CorpusSpec(max_bytes=train_cfg.corpus_bytes)
    corpus = ensure_corpus(spec, train_cfg.data_dir)
    n_train = len(corpus.split("train"))
    say(f"corpus: {corpus.dir} ({n_train} train shards, {sum(s.tokens for s in corpus.shards):,} tokens)")
    loader = TokenLoader(
        corpus, batch_size=train_cfg.batch_size, seq_len=model_cfg.seq_len, seed=train_cfg.seed
    )

    zr.init(address)
    torch.manual_seed(train_cfg.seed)
    model = zr.MoETransformer(model_cfg)
    degree = train_cfg.expert_degree
    say(f"starting {degree} compute units for {model_cfg.n_layers} x {model_cfg.n_experts} experts")
    durable = train_cfg.checkpoint_dir is not None
    checkpoint: zr.TrickleCheckpoint | bool = zr.TrickleCheckpoint(
        durable_uri=train_cfg.checkpoint_dir,
        durable_every=train_cfg.checkpoint_every,
        pool_bytes=train_cfg.pool_bytes,
    )
    strategies = _strategies(train_cfg)
    if len(strategies) > 1:
        say(f"mesh: {' x '.join(map(repr, strategies))}")
        # replicas recover from a sibling, their shared expert units from MemoryPool snapshots; no
        # durable checkpoints of them yet (TrainConfig refuses checkpoint_dir with data_parallel)
        # (pipeline stages calling shared experts keep no snapshots: api/pipeline_parallel.py)
        pipelined = train_cfg.pipeline_stages > 1
        checkpoint = False if pipelined else zr.TrickleCheckpoint(pool_bytes=train_cfg.pool_bytes)
    dmodel = zr.parallelize(model, *strategies, runtime=runtime_cfg, checkpoint=checkpoint)
    if isinstance(dmodel, zr.DistributedModule):
        dmodel.track_data_position(lambda: loader.state().to_dict())
    resumed_from = None
    try:
        opt = dmodel.optimizer(torch.optim.AdamW, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
        first = 0
        if resume:
            first = resumed_from = _resume(dmodel, loader, say)
        metrics = []
        tokens_per_step = train_cfg.batch_size * model_cfg.seq_len
        phase = chaos or (lambda _dm, _step, _phase: None)
        for step in range(first, train_cfg.steps):
            t0 = time.perf_counter()
            x, y = next(loader)
            opt.zero_grad()
            phase(dmodel, step, "forward")
            _, loss = dmodel(x, y)
            phase(dmodel, step, "backward")
            loss.backward()
            opt.step()
            phase(dmodel, step, "optimizer")
            value = loss.item()
            dt = time.perf_counter() - t0
            if not math.isfinite(value):
                raise zr.errors.ZettaError(
                    f"loss became {value} at step {step}; lower TrainConfig.lr (now {train_cfg.lr:g})"
                )
            m = StepMetrics(step=step, loss=value, step_time_s=dt, tokens_per_s=tokens_per_step / dt)
            metrics.append(m)
            if on_step is not None:
                on_step(m)
        if durable:
            dmodel.checkpoint()  # the last step too (a no-op if the schedule wrote it)
        state = dmodel.state_dict()
        val_loss = _validate(dmodel, corpus, model_cfg, train_cfg, val_batches)
        events = [*dmodel.recoveries, *getattr(dmodel, "recovered_experts", [])]
        recoveries = [_recovery_record(asdict(e)) for e in events]
    finally:
        dmodel.close()
    return TrainResult(
        steps=metrics,
        val_loss=val_loss,
        wall_time_s=time.perf_counter() - started,
        corpus_dir=str(corpus.dir),
        loader_state=loader.state().to_dict(),
        config={"model": asdict(model_cfg), "train": asdict(train_cfg), "runtime": asdict(runtime_cfg)},
        state_sha256=state_sha256(state),
        resumed_from=resumed_from,
        recoveries=recoveries,
    )


def _recovery_record(event: dict[str, Any]) -> dict[str, Any]:
    """A recovery as the chaos report reads it (the fields of ``control.RecoveryEvent``), whatever
    recovered: an expert unit replayed by the fault manager, a replica copied from a sibling, or the
    shared expert units rolled back with the replicas redoing the step."""
    if "restored_step" in event:
        return event
    if "sibling" in event:  # control.sibling_repair.ReplicaRecovery: no step redone, part of one replayed
        step, restored, action = (
            event["steps_applied"],
            event["steps_applied"],
            f"copying replica {event['sibling']}",
        )
    else:  # api.expert_units.ExpertRollback: the step in progress redone from the snapshot before it
        restored = event["snapshot_step"]
        step, action = restored + 1, "rolling the expert units back"
    return {
        "unit": event["unit"],
        "kind": event["kind"],
        "phase": event["phase"],
        "step": step,
        "action": action,
        "node": None,
        "restored_step": restored,
        "redone_records": 0,
        "recovery_s": event["recovery_s"],
        "replayed_calls": event.get("replayed_calls", 0),
    }


def _strategies(t: TrainConfig) -> list[Any]:
    """The mesh of a run: the experts on ``expert_degree`` units, and data or pipeline parallelism of
    the dense part when asked for."""
    strategies: list[Any] = [zr.ExpertParallel(degree=t.expert_degree)]
    if t.data_parallel > 1:
        strategies.append(zr.DataParallel(degree=t.data_parallel))
    if t.pipeline_stages > 1:
        m = t.microbatches or 2 * t.pipeline_stages
        strategies.append(zr.PipelineParallel(stages=t.pipeline_stages, microbatches=m))
    return strategies


def state_sha256(state: dict[str, torch.Tensor]) -> str:
    """One hash of a model state: names, shapes, dtypes and bytes, in key order."""
    h = hashlib.sha256()
    for name, t in state.items():
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def _resume(dmodel: zr.DistributedModule, loader: TokenLoader, say: Callable[[str], None]) -> int:
    info = dmodel.load_checkpoint()
    if info is None:
        say("no durable checkpoint yet: starting at step 0")
        return 0
    loader.load_state(LoaderState.from_dict(info.meta["data_position"]))
    say(f"resumed from the checkpoint of step {info.step} ({info.path})")
    return info.step


def _validate(
    dmodel: zr.DistributedModule,
    corpus: Corpus,
    model_cfg: MoEConfig,
    train_cfg: TrainConfig,
    batches: int,
) -> float | None:
    if batches <= 0 or sum(s.tokens for s in corpus.split("val")) <= model_cfg.seq_len:
        return None  # no held-out shard, or one too short for a single window
    val = TokenLoader(
        corpus, batch_size=train_cfg.batch_size, seq_len=model_cfg.seq_len, seed=train_cfg.seed, split="val"
    )
    dmodel.eval()
    try:
        with torch.no_grad():
            losses = [dmodel(*val.batch(i))[1].item() for i in range(batches)]
    finally:
        dmodel.train()
    return sum(losses) / len(losses)
