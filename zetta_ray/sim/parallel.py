"""How a training job is split: tensor (tp), pipeline (pp), data (dp) and expert (ep) parallelism.

Units are numbered the way Megatron-LM builds its groups, tensor-parallel ranks fastest, then data,
then pipeline: unit ``u = tp_rank + tp * (dp_rank + dp * pp_rank)``. So

    a tensor-parallel group is ``tp`` consecutive units (kept inside one NVLink domain),
    a data-parallel group is ``dp`` units ``tp`` apart,
    a pipeline group is ``pp`` units ``tp * dp`` apart.

Experts are laid out as in Megatron-Core's "parallel folding" with expert tensor parallelism 1: the
``tp * dp`` units of one pipeline stage are cut into expert groups of ``ep`` consecutive units, each
holding ``n_experts / ep`` whole experts of every MoE block in the stage; the ``tp * dp / ep`` copies
of an expert form its expert-data-parallel group (``ep`` apart).

``virtual_stages`` (v) is the interleaved 1F1B schedule of Narayanan et al.: each unit holds v chunks of
``layers / (pp * v)`` layers, which cuts the pipeline bubble by v at the price of v times more
point-to-point transfers.
"""

from __future__ import annotations

from dataclasses import dataclass

from zetta_ray.checks import positive_int
from zetta_ray.errors import ConfigError
from zetta_ray.model_spec import ModelSpec

__all__ = ["RECOMPUTE", "Group", "ParallelSpec"]

RECOMPUTE = ("none", "selective", "full")


@dataclass(kw_only=True, slots=True, frozen=True)
class Group:
    """A communicating group of ``size`` units, ``stride`` apart in unit numbering."""

    size: int
    stride: int


@dataclass(kw_only=True, slots=True, frozen=True)
class ParallelSpec:
    """A parallel mesh and schedule. Validate it against a model with ``check(model, units)``.

    ``zero1`` shards optimizer state (and fp32 master weights) over the data-parallel group, as
    Megatron's distributed optimizer and ZeRO stage 1 do. ``overlap_comm`` hides data-parallel gradient
    reduction and pipeline point-to-point transfers behind compute (what current Megatron-Core does);
    off, they sit on the critical path as in the 2021-2022 Megatron-LM papers.
    """

    tp: int = 1
    pp: int = 1
    dp: int = 1
    ep: int = 1
    virtual_stages: int = 1
    micro_batch: int = 1
    global_batch: int
    recompute: str = "none"
    sequence_parallel: bool = False
    zero1: bool = False
    overlap_comm: bool = False

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "dp", "ep", "virtual_stages", "micro_batch", "global_batch"):
            positive_int(f"parallel.{name}", getattr(self, name))
        if self.recompute not in RECOMPUTE:
            raise ConfigError(
                f"parallel.recompute={self.recompute!r} is invalid: use one of {list(RECOMPUTE)}"
            )
        if self.global_batch % (self.dp * self.micro_batch):
            raise ConfigError(
                f"parallel.global_batch={self.global_batch} must be a multiple of dp x micro_batch "
                f"({self.dp} x {self.micro_batch} = {self.dp * self.micro_batch}): every data-parallel "
                "replica runs a whole number of micro-batches"
            )
        if self.sequence_parallel and self.tp == 1:
            raise ConfigError(
                "parallel.sequence_parallel=true needs tp > 1: it splits work across the TP group"
            )
        if self.virtual_stages > 1 and self.pp == 1:
            raise ConfigError(
                f"parallel.virtual_stages={self.virtual_stages} needs pp > 1: interleaving splits pipeline "
                "stages into chunks"
            )

    # ---- derived sizes -------------------------------------------------------------------------------
    @property
    def units(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def micro_batches(self) -> int:
        """Micro-batches each pipeline runs per step (m)."""
        return self.global_batch // (self.dp * self.micro_batch)

    def layers_per_stage(self, model: ModelSpec) -> int:
        return model.layers // self.pp

    def experts_per_unit(self, model: ModelSpec) -> int:
        return model.n_experts // self.ep if model.kind == "moe" else 0

    # ---- groups in unit numbering --------------------------------------------------------------------
    @property
    def tp_group(self) -> Group:
        return Group(size=self.tp, stride=1)

    @property
    def dp_group(self) -> Group:
        return Group(size=self.dp, stride=self.tp)

    @property
    def pp_group(self) -> Group:
        return Group(size=self.pp, stride=self.tp * self.dp)

    @property
    def ep_group(self) -> Group:
        return Group(size=self.ep, stride=1)

    @property
    def expert_dp_group(self) -> Group:
        return Group(size=self.tp * self.dp // self.ep, stride=self.ep)

    # ---- validation against a model and a machine ----------------------------------------------------
    def check(self, model: ModelSpec, units: int) -> None:
        """Raise ``ConfigError`` naming the rule if this mesh cannot run ``model`` on ``units`` units."""
        if self.units != units:
            raise ConfigError(
                f"parallel degrees multiply to tp x pp x dp = {self.tp} x {self.pp} x {self.dp} = "
                f"{self.units}, but hardware.units = {units}; make the product equal the unit count"
            )
        if model.layers % self.pp:
            raise ConfigError(f"parallel.pp={self.pp} must divide model.layers ({model.layers})")
        if (model.layers // self.pp) % self.virtual_stages:
            raise ConfigError(
                f"parallel.virtual_stages={self.virtual_stages} must divide layers per stage "
                f"({model.layers} / {self.pp} = {model.layers // self.pp})"
            )
        if model.heads % self.tp:
            raise ConfigError(f"parallel.tp={self.tp} must divide model.heads ({model.heads})")
        if model.f % self.tp:
            raise ConfigError(f"parallel.tp={self.tp} must divide the FFN hidden size ({model.f})")
        if model.kind == "dense" and self.ep != 1:
            raise ConfigError(f"parallel.ep={self.ep} needs model.kind='moe'; a dense model has no experts")
        if model.kind == "moe":
            if model.n_experts % self.ep:
                raise ConfigError(f"parallel.ep={self.ep} must divide model.n_experts ({model.n_experts})")
            if (self.tp * self.dp) % self.ep:
                raise ConfigError(
                    f"parallel.ep={self.ep} must divide tp x dp = {self.tp * self.dp}: expert groups are cut "
                    "from the units of one pipeline stage"
                )
        if self.virtual_stages > 1 and self.micro_batches % self.pp:
            raise ConfigError(
                f"the interleaved schedule (virtual_stages={self.virtual_stages}) needs the micro-batches "
                f"per replica ({self.micro_batches} = global_batch / (dp x micro_batch)) to be a multiple "
                f"of pp ({self.pp}), as in Megatron-LM; raise global_batch or set virtual_stages = 1"
            )
        if self.micro_batches < 1:
            raise ConfigError(f"parallel.global_batch={self.global_batch} leaves no micro-batch per replica")
