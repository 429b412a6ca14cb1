"""Configuration dataclasses. Keyword-only, validated in ``__post_init__``.

Every check raises ``ConfigError`` (a ``ValueError``) naming the field, the value and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from zetta_ray.checks import check, is_int, is_number, positive_int
from zetta_ray.errors import ConfigError

__all__ = ["MoEConfig", "RuntimeConfig", "TrainConfig", "from_mapping"]


@dataclass(kw_only=True, slots=True)
class MoEConfig:
    """Shape of the MoE transformer language model (``zr.MoETransformer``).

    ``capacity_factor=None`` routes dropless: every token reaches its top-k experts. A number gives each
    expert room for ``ceil(capacity_factor * tokens * top_k / n_experts)`` rows; assignments past that are
    dropped (first choices are served before second choices, then by token position).
    """

    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_experts: int = 8
    top_k: int = 2
    d_ff: int = 512
    seq_len: int = 128
    capacity_factor: float | None = None
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001
    init_std: float = 0.02

    def __post_init__(self) -> None:
        c = "MoEConfig"
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_experts", "top_k", "d_ff", "seq_len"):
            positive_int(f"{c}.{name}", getattr(self, name))
        check(
            self.d_model % self.n_heads == 0,
            f"{c}.d_model",
            self.d_model,
            f"must be divisible by n_heads ({self.n_heads}); pick d_model as a multiple of n_heads",
        )
        check(
            self.top_k <= self.n_experts,
            f"{c}.top_k",
            self.top_k,
            f"must be <= n_experts ({self.n_experts})",
        )
        check(
            self.capacity_factor is None or (is_number(self.capacity_factor) and self.capacity_factor > 0),
            f"{c}.capacity_factor",
            self.capacity_factor,
            "must be a positive number, or None for dropless routing",
        )
        for name in ("aux_loss_coef", "z_loss_coef"):
            v = getattr(self, name)
            check(is_number(v) and v >= 0, f"{c}.{name}", v, "must be a number >= 0")
        check(is_number(self.init_std) and self.init_std > 0, f"{c}.init_std", self.init_std, "must be > 0")


@dataclass(kw_only=True, slots=True)
class RuntimeConfig:
    """How the dataflow runtime talks to its actors.

    ``deadline_s`` bounds every remote call. It must exceed the slowest legitimate call (one expert's
    forward or backward plus transfer); too small turns a slow step into a false fault, too large delays
    the detection of a stalled unit. ``start_deadline_s`` bounds actor start-up, which includes importing
    torch in a fresh worker process.

    ``shared_memory`` sends the rows of units on the controller's node through shared segments that
    the controller reuses (``actors/shm.py``) instead of Ray's object store; units elsewhere always
    use the object store. A layer's rows smaller than ``shared_memory_min_bytes`` go inline with the
    calls instead (Ray sends arguments under 100 KiB in the call itself, which beats a copy).
    """

    deadline_s: float = 60.0
    start_deadline_s: float = 180.0
    threads_per_unit: int = 1
    unit_num_cpus: float | None = None
    shared_memory: bool = True
    shared_memory_min_bytes: int = 100 << 10

    def __post_init__(self) -> None:
        c = "RuntimeConfig"
        for name in ("deadline_s", "start_deadline_s"):
            v = getattr(self, name)
            check(is_number(v) and v > 0, f"{c}.{name}", v, "must be a number of seconds > 0")
        positive_int(f"{c}.threads_per_unit", self.threads_per_unit)
        check(
            isinstance(self.shared_memory, bool),
            f"{c}.shared_memory",
            self.shared_memory,
            "must be True or False",
        )
        check(
            self.unit_num_cpus is None or (is_number(self.unit_num_cpus) and self.unit_num_cpus >= 0),
            f"{c}.unit_num_cpus",
            self.unit_num_cpus,
            "must be >= 0, or None to share the cluster's CPUs evenly among the units",
        )


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    """The ``zetta-ray train`` loop.

    ``checkpoint_dir`` (a local path or any URI ``pyarrow.fs`` opens: ``s3://``, ``gs://``, ``hdfs://``)
    receives a durable checkpoint every ``checkpoint_every`` steps (and after the last one), written off
    the training thread; ``zetta-ray train --resume`` continues from the newest one. ``pool_bytes`` is
    ``TrickleCheckpoint.pool_bytes``: the most bytes of snapshots each node's MemoryPool holds.

    ``data_parallel`` > 1 trains that many dense replicas, each on its share of every batch, sharing
    the ``expert_degree`` expert units (``zr.DataParallel``); ``pipeline_stages`` > 1 asks for pipeline
    stages of ``microbatches`` micro-batches (default ``2 * pipeline_stages``), which this version runs
    on dense models only, so ``zetta-ray train`` refuses it for the MoE transformer by name.

    ``data_dir`` is the corpus directory itself; ``None`` uses ``~/.cache/zetta_ray/corpus-<hash of the
    corpus settings>`` (``XDG_CACHE_HOME`` is honoured). The corpus is built there on first use.
    """

    steps: int = 50
    batch_size: int = 8
    lr: float = 3e-3
    weight_decay: float = 0.0
    seed: int = 0
    expert_degree: int = 4
    data_dir: str | None = None
    corpus_bytes: int = 4_000_000
    checkpoint_dir: str | None = None
    checkpoint_every: int = 100
    pool_bytes: int = 2 << 30
    data_parallel: int = 1
    pipeline_stages: int = 1
    microbatches: int | None = None

    def __post_init__(self) -> None:
        c = "TrainConfig"
        for name in (
            "steps",
            "batch_size",
            "expert_degree",
            "corpus_bytes",
            "checkpoint_every",
            "pool_bytes",
            "data_parallel",
            "pipeline_stages",
        ):
            positive_int(f"{c}.{name}", getattr(self, name))
        if self.microbatches is not None:
            positive_int(f"{c}.microbatches", self.microbatches)
        parts = self.data_parallel * (
            self.microbatches or (2 * self.pipeline_stages if self.pipeline_stages > 1 else 1)
        )
        check(
            self.batch_size % parts == 0,
            f"{c}.batch_size",
            self.batch_size,
            f"must split into data_parallel x microbatches = {parts} equal parts; use a multiple of {parts}",
        )
        check(
            self.data_parallel == 1 or self.checkpoint_dir is None,
            f"{c}.checkpoint_dir",
            self.checkpoint_dir,
            "must be None with data_parallel > 1: durable checkpoints of data-parallel replicas and the "
            "expert units they share are not written in this version (a dead replica is rebuilt from a "
            "live sibling instead)",
        )
        check(is_number(self.lr) and self.lr > 0, f"{c}.lr", self.lr, "must be a number > 0")
        check(
            is_number(self.weight_decay) and self.weight_decay >= 0,
            f"{c}.weight_decay",
            self.weight_decay,
            "must be a number >= 0",
        )
        check(
            is_int(self.seed) and self.seed >= 0,
            f"{c}.seed",
            self.seed,
            "must be an integer >= 0",
        )
        check(
            self.data_dir is None or isinstance(self.data_dir, str),
            f"{c}.data_dir",
            self.data_dir,
            "must be a directory path (string) or None for the default cache",
        )


def from_mapping(cls: type, values: dict[str, Any], where: str) -> Any:
    """Build ``cls`` from a mapping (a TOML table), rejecting keys that ``cls`` does not have."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in [{where}]; {cls.__name__} accepts {sorted(known)}")
    return cls(**values)
