"""One training step: the pipeline schedule around the block costs, then gradients and optimizer.

With ``m`` micro-batches per pipeline, ``p`` stages, ``v`` virtual stages per unit (interleaved 1F1B,
Narayanan et al. 2021 section 2.2) and ``T`` the time one stage spends on one micro-batch (forward,
backward and recomputation of its layers):

    pipeline   = m * T_max + (p - 1) / v * T          bubble fraction (p - 1) / (v m)

``T_max`` adds to ``T`` the extra work of the slowest stage: the logits and loss on the last stage, the
embedding on the first (both on the only stage when p = 1). Without ``overlap_comm`` each micro-batch
also waits for its activation and gradient to cross each of its v stage boundaries.

After the pipeline drains, gradients are reduced over the data-parallel group (16-bit would do, but
Megatron reduces its fp32 ``main_grad``: 4 bytes per parameter; with ``zero1``, a reduce-scatter plus
an all-gather of the 16-bit weights), expert gradients over their expert-data group, and the two copies
of the tied embedding between first and last stage. With ``overlap_comm`` the reduction runs under the
last micro-batch's backward and only the excess is exposed. The optimizer is memory-bound: 34 bytes
of HBM traffic per parameter it steps (read fp32 weight, moments and gradient; write them and the
16-bit copy; read the gradient again for the norm).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from zetta_ray.model_spec import ModelSpec
from zetta_ray.sim import comm
from zetta_ray.sim.calibration import CALIBRATED, Efficiency
from zetta_ray.sim.comm import Comm
from zetta_ray.sim.compute import BYTES, block_cost, embedding_cost, logits_cost
from zetta_ray.sim.hardware import Hardware
from zetta_ray.sim.memory import MemoryReport, memory_per_unit, params_per_unit
from zetta_ray.sim.parallel import Group, ParallelSpec

__all__ = ["StepReport", "step"]

OPTIMIZER_BYTES_PER_PARAM = 34.0


@dataclass(kw_only=True, slots=True)
class StepReport:
    """Predicted step of one mesh: seconds by phase, utilisation, memory and traffic per tier.

    ``work_s`` is the busy time of one pipeline stage per step by kind of work (GEMMs, attention core,
    element-wise, exposed TP collectives, all-to-all, launch overhead; ``experts`` is inside ``gemm``),
    without the bubble, gradient reduction and optimizer that ``as_dict`` lists beside it.
    """

    step_time_s: float
    pipeline_s: float
    bubble_s: float
    grad_sync_s: float
    optimizer_s: float
    tokens_per_s: float
    mfu: float
    hfu: float
    memory: MemoryReport
    bytes_per_tier: dict[str, float]
    breakdown: dict[str, float] = field(default_factory=dict)
    work_s: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return {
            "step_time_s": self.step_time_s,
            "tokens_per_s": self.tokens_per_s,
            "mfu": self.mfu,
            "hfu": self.hfu,
            "memory_per_unit_bytes": self.memory.total,
            "memory_breakdown_bytes": self.memory.as_dict(),
            "bytes_per_tier_per_unit": self.bytes_per_tier,
            "time_breakdown_s": {
                "pipeline": self.pipeline_s,
                "bubble": self.bubble_s,
                "grad_sync": self.grad_sync_s,
                "optimizer": self.optimizer_s,
                **self.breakdown,
            },
            "stage_work_by_kind_s": self.work_s,
        }


def _grad_sync(model: ModelSpec, par: ParallelSpec, hw: Hardware, eff: Efficiency) -> Comm:
    dense, expert = params_per_unit(model, par, embedding=True)
    out = Comm.zero(len(hw.tiers))
    groups: list[tuple[Group, float]] = [(par.dp_group, dense)]
    if expert:
        groups.append((par.expert_dp_group, expert))
    for group, n in groups:
        if group.size <= 1:
            continue
        if par.zero1:
            out.add(comm.reduce_scatter(hw, eff, group, 4.0 * n))
            out.add(comm.all_gather(hw, eff, group, BYTES * n))
        else:
            out.add(comm.all_reduce(hw, eff, group, 4.0 * n))
    if par.pp > 1:  # tied input/output embedding lives on the first and last stage
        emb = 4.0 * model.vocab * model.hidden / par.tp
        out.add(comm.all_reduce(hw, eff, Group(size=2, stride=par.tp * par.dp * (par.pp - 1)), emb))
    return out


def _optimizer_time(model: ModelSpec, par: ParallelSpec, hw: Hardware, eff: Efficiency) -> float:
    dense, expert = params_per_unit(model, par, embedding=True)
    if par.zero1:
        dense /= par.dp
        expert /= max(1, par.tp * par.dp // par.ep)
    return OPTIMIZER_BYTES_PER_PARAM * (dense + expert) / (hw.unit.hbm_bandwidth * eff.memory)


def step(
    model: ModelSpec, par: ParallelSpec, hw: Hardware, eff: Efficiency = CALIBRATED, *, check: bool = True
) -> StepReport:
    """Predict one training step of ``model`` on ``hw`` with mesh ``par`` (validated unless ``check``)."""
    if check:
        par.check(model, hw.units)
    lps = par.layers_per_stage(model)
    moe_per_stage = model.moe_layers / par.pp
    dense_blocks = lps - moe_per_stage

    dense_cost = block_cost(model, par, hw, eff, moe=False)
    m = par.micro_batches
    work = {k: m * dense_blocks * v for k, v in dense_cost.parts.items()}
    moe_layer = 0.0
    stage_t = dense_blocks * dense_cost.total
    traffic = dense_cost.traffic.scaled(dense_blocks)
    flops = dense_blocks * dense_cost.flops
    backward_t = dense_blocks * dense_cost.backward
    if moe_per_stage:
        moe_cost = block_cost(model, par, hw, eff, moe=True)
        stage_t += moe_per_stage * moe_cost.total
        traffic.add(moe_cost.traffic.scaled(moe_per_stage))
        flops += moe_per_stage * moe_cost.flops
        backward_t += moe_per_stage * moe_cost.backward
        for k, v in moe_cost.parts.items():
            work[k] += m * moe_per_stage * v
        moe_layer = m * (moe_cost.parts["a2a"] + moe_cost.parts["experts"])

    p2p_bytes = BYTES * par.micro_batch * model.seq_len * model.hidden / par.tp  # scatter-gather
    if par.pp > 1:
        hop = comm.p2p(hw, eff, par.tp * par.dp, p2p_bytes)
        traffic.add(hop.scaled(2.0 * par.virtual_stages))
        if not par.overlap_comm:
            stage_t += 2.0 * par.virtual_stages * hop.time

    head = logits_cost(model, par, hw, eff)
    embed = embedding_cost(model, par, hw, eff)
    extra = head + embed if par.pp == 1 else max(head, embed)
    p, v = par.pp, par.virtual_stages
    bubble = (p - 1) / v * stage_t
    pipeline = m * (stage_t + extra) + bubble

    sync = _grad_sync(model, par, hw, eff)
    traffic = traffic.scaled(m).add(sync)
    exposed_sync = max(0.0, sync.time - backward_t) if par.overlap_comm else sync.time
    optimizer = _optimizer_time(model, par, hw, eff)
    step_time = pipeline + exposed_sync + optimizer

    tokens = par.global_batch * model.seq_len
    peak = hw.peak_flops * par.units
    mfu = tokens * model.model_flops_per_token() / (step_time * peak)
    hw_flops = tokens * (model.model_flops_per_token() + model.recompute_flops_per_token(par.recompute))
    names = [t.name for t in hw.tiers]
    return StepReport(
        step_time_s=step_time,
        pipeline_s=pipeline,
        bubble_s=bubble,
        grad_sync_s=exposed_sync,
        optimizer_s=optimizer,
        tokens_per_s=tokens / step_time,
        mfu=mfu,
        hfu=hw_flops / (step_time * peak),
        memory=memory_per_unit(model, par),
        bytes_per_tier=dict(zip(names, traffic.bytes_tier, strict=True)),
        breakdown={
            "stage_per_microbatch": stage_t,
            "last_or_first_stage_extra": extra,
            "flops_per_unit_per_microbatch": flops,
            "moe_layer_a2a_and_experts_per_step": moe_layer,
        },
        work_s=work,
    )
