"""Memory per unit: parameters, gradients, optimizer state and activations (Korthikanti et al. 2022).

Weights and state, bytes per parameter in mixed-precision Adam: 2 (16-bit weights) + 4 (fp32 gradient
accumulator, Megatron's ``main_grad``) + 12 (fp32 master weights, first and second moments) = 18. With
``zero1`` the 12 are sharded over the data-parallel group (experts: over their expert-data group).

Activations of one block for one micro-batch, in bytes (b micro-batch, s sequence, h hidden, a heads,
t tensor-parallel degree; Korthikanti et al. eq. 1-5, generalised to any FFN size f and grouped K/V):

    replicated  R = 10 s b h      layer-norm inputs, QKV input, fc1 input, two dropout masks
    parallel    P = (4 + 4 g/a) s b h + 2 s b f (2 + gated)      Q, K, V, projection input, MLP inner
    attention   S = 5 a s^2 b     softmax output, its dropout mask and dropout output (0 with flash)

    none        R + (P + S) / t         (R / t as well with sequence parallelism)
    selective   R + P / t               (S is recomputed)
    full        2 s b h                 (only the block input; / t with sequence parallelism)

An MoE block stores, instead of the dense MLP inner ``2 s b f (2 + gated) / t``, the permuted rows it
routes: ``rows (2 h + 2 f (2 + gated))`` with ``rows = s b k x load / t`` on the busiest unit.

The first pipeline stage holds the most: in 1F1B it keeps ``min(m, p)`` micro-batches in flight, and
the interleaved schedule multiplies that by ``1 + (p - 1) / (p v)``. Full recomputation also needs one
block's complete activations while it runs backward. The last stage adds fp32 logits ``4 s b V / t``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from zetta_ray.model_spec import ModelSpec
from zetta_ray.sim.parallel import ParallelSpec

__all__ = ["RESERVED_BYTES", "MemoryReport", "memory_per_unit", "stage_activation_bytes"]

#: CUDA context, NCCL buffers and allocator slack every unit keeps free (not available to the model).
RESERVED_BYTES = 2.0e9


@dataclass(kw_only=True, slots=True)
class MemoryReport:
    """Bytes per unit on the fullest unit (first pipeline stage, or last when its logits dominate)."""

    parameters: float
    gradients: float
    optimizer: float
    activations: float
    reserved: float = RESERVED_BYTES

    @property
    def total(self) -> float:
        return self.parameters + self.gradients + self.optimizer + self.activations + self.reserved

    def as_dict(self) -> dict[str, float]:
        return {
            "parameters": self.parameters,
            "gradients": self.gradients,
            "optimizer": self.optimizer,
            "activations": self.activations,
            "reserved": self.reserved,
            "total": self.total,
        }


def params_per_unit(model: ModelSpec, par: ParallelSpec, *, embedding: bool) -> tuple[float, float]:
    """(dense, expert) parameters one unit of a stage holds; ``embedding`` adds its vocabulary shard."""
    lps = par.layers_per_stage(model)
    moe_in_stage = model.moe_layers / par.pp
    dense_mlp_in_stage = lps - moe_in_stage
    dense = (
        lps * model.block_dense_params / par.tp
        + dense_mlp_in_stage * model.mlp_params / par.tp
        + moe_in_stage * model.hidden * model.n_experts / par.tp
    )
    if embedding:
        dense += model.vocab * model.hidden / par.tp
    expert = moe_in_stage * par.experts_per_unit(model) * model.mlp_params
    return dense, expert


def block_activation_bytes(model: ModelSpec, par: ParallelSpec, *, moe: bool) -> float:
    """Bytes one block stores for backward, for one micro-batch, on one unit."""
    s, b, h, t = model.seq_len, par.micro_batch, model.hidden, par.tp
    sbh = s * b * h
    gated = 1 if model.gated_mlp else 0
    replicated = 10.0 * sbh
    attn_inner = (4.0 + 4.0 * model.kv_ratio) * sbh
    if moe:
        rows = s * b * model.top_k * model.load_factor / t
        mlp_inner_unit = rows * (2.0 * h + 2.0 * model.f * (2 + gated))
    else:
        mlp_inner_unit = 2.0 * s * b * model.f * (2 + gated) / t
    scores = 0.0 if model.flash_attention else 5.0 * model.heads * s * s * b
    rep = replicated / t if par.sequence_parallel else replicated
    if par.recompute == "full":
        return 2.0 * sbh / (t if par.sequence_parallel else 1)
    if par.recompute == "selective":
        return rep + attn_inner / t + mlp_inner_unit
    return rep + (attn_inner + scores) / t + mlp_inner_unit


def _inflight(par: ParallelSpec) -> float:
    p, v, m = par.pp, par.virtual_stages, par.micro_batches
    base = float(min(m, p))
    if v > 1:
        base *= 1.0 + (p - 1) / (p * v)
    return base


def stage_activation_bytes(model: ModelSpec, par: ParallelSpec) -> float:
    """Block activations the first pipeline stage holds at its peak (all in-flight micro-batches)."""
    moe_frac = model.moe_layers / model.layers
    per_layer = (1 - moe_frac) * block_activation_bytes(model, par, moe=False)
    if model.moe_layers:
        per_layer += moe_frac * block_activation_bytes(model, par, moe=True)
    return per_layer * par.layers_per_stage(model) * _inflight(par)


def memory_per_unit(model: ModelSpec, par: ParallelSpec) -> MemoryReport:
    """Memory on the fullest unit of the mesh (the larger of the first and last pipeline stages)."""
    first_acts = stage_activation_bytes(model, par)
    if par.recompute == "full":  # one block recomputed in full while its backward runs
        working = replace(par, recompute="none")
        first_acts += block_activation_bytes(model, working, moe=model.moe_layers > 0)
    last_acts = first_acts / _inflight(par)  # the last stage keeps one micro-batch in flight
    logits = 4.0 * model.seq_len * par.micro_batch * model.vocab / par.tp

    dense, expert = params_per_unit(model, par, embedding=True)
    expert_dp = max(1, par.tp * par.dp // max(par.ep, 1))
    optim = 12.0 * (dense / par.dp + expert / expert_dp) if par.zero1 else 12.0 * (dense + expert)
    reports = [
        MemoryReport(
            parameters=2.0 * (dense + expert),
            gradients=4.0 * (dense + expert),
            optimizer=optim,
            activations=acts,
        )
        for acts in ((first_acts + logits) if par.pp == 1 else first_acts, last_acts + logits)
    ]
    return max(reports, key=lambda r: r.total)
