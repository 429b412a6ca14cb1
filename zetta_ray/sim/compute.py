"""Time of one transformer block for one micro-batch on one unit: forward, backward, recomputation.

Every block is costed as three kinds of work, each at its own achieved fraction of a datasheet peak
(``sim/calibration.py``):

* matrix multiplies (QKV, output projection, MLP or experts, router): ``2 x rows x in x out`` FLOPs at
  ``gemm`` efficiency; backward is twice the forward (input gradient and weight gradient);
* the attention core (``QK^T`` and ``softmax x V``, ``4 b s^2 h / t`` FLOPs) at ``attention``
  efficiency, or one fused FlashAttention kernel at ``flash`` efficiency (causal: half the work);
* memory-bound element-wise kernels, as bytes over HBM bandwidth at ``memory`` efficiency: layer norms
  and fused bias-dropout-add (22 bytes per ``b s h`` element, divided by t only under sequence
  parallelism), the GeLU (4 bytes per ``b s f / t`` element, 6 for SwiGLU), and without flash the
  scale-mask-softmax and attention dropout (9 bytes per ``a b s^2 / t`` element). Backward moves twice
  the forward bytes.

Tensor-parallel communication follows Megatron-LM: per block two all-reduces of the ``2 b s h``-byte
activations forward and two backward (sequence parallelism replaces each by a reduce-scatter plus an
all-gather: the same bytes). Backward collectives run asynchronously beside the weight-gradient GEMMs
of the column-parallel layers, so only what exceeds them is exposed. An MoE block replaces the MLP's
collective by an all-to-all dispatch and combine over the expert group, forward and backward.

Recomputation: ``full`` reruns the block's forward (and its collectives) before backward; ``selective``
reruns only the attention core (Korthikanti et al. 2022, section 5); ``none`` stores everything.
"""

from __future__ import annotations

from dataclasses import dataclass

from zetta_ray.model_spec import ModelSpec
from zetta_ray.sim import comm
from zetta_ray.sim.calibration import Efficiency
from zetta_ray.sim.comm import Comm
from zetta_ray.sim.hardware import Hardware
from zetta_ray.sim.parallel import ParallelSpec

__all__ = ["BlockCost", "block_cost", "logits_cost"]

BYTES = 2  # 16-bit activations


@dataclass(slots=True)
class BlockCost:
    """Seconds of one block and one micro-batch on one unit, and what it sent per tier.

    ``parts`` splits ``total`` by kind of work (forward + backward + recomputation): ``gemm``,
    ``attention`` (the attention core), ``elementwise``, ``tp_comm`` (exposed), ``a2a`` (expert
    dispatch and combine), ``overhead`` (kernel launches); ``experts`` is the share of ``gemm`` spent in
    the expert MLPs.
    """

    forward: float
    backward: float
    recompute: float
    traffic: Comm
    flops: float
    parts: dict[str, float]

    @property
    def total(self) -> float:
        return self.forward + self.backward + self.recompute


def _gemm(flops: float, hw: Hardware, eff: Efficiency) -> float:
    return flops / (hw.achievable_flops * eff.gemm)


def _mem(nbytes: float, hw: Hardware, eff: Efficiency) -> float:
    return nbytes / (hw.unit.hbm_bandwidth * eff.memory)


def block_cost(model: ModelSpec, par: ParallelSpec, hw: Hardware, eff: Efficiency, *, moe: bool) -> BlockCost:
    """Cost of one transformer block (an MoE block when ``moe``) for one micro-batch on one unit."""
    t = par.tp
    tokens = par.micro_batch * model.seq_len
    h, s, f = model.hidden, model.seq_len, model.f
    n_tiers = len(hw.tiers)

    # -- attention half --------------------------------------------------------------------------------
    qkv_flops = 2.0 * tokens * h * h * (1 + 2 * model.kv_ratio) / t
    proj_flops = 2.0 * tokens * h * h / t
    core_flops = 4.0 * tokens * s * h / t
    if model.flash_attention:
        core = 0.5 * core_flops / (hw.achievable_flops * eff.flash)
        core_bytes = 0.0
    else:
        core = core_flops / (hw.achievable_flops * eff.attention)
        core_bytes = 9.0 * model.heads * s * tokens / t
    core += _mem(core_bytes, hw, eff)

    # -- MLP half: dense MLP or routed experts ---------------------------------------------------------
    if moe:
        rows = tokens / t * model.top_k * model.load_factor  # expert rows the busiest unit computes
        mlp_flops = 2.0 * rows * model.mlp_params + 2.0 * tokens / t * h * model.n_experts
        fc1_flops = 2.0 * rows * h * f * (model.mlp_matrices - 1)
        act_bytes = (2 * model.mlp_matrices) * rows * f + 8.0 * rows * h  # activation + permute/unpermute
    else:
        mlp_flops = 2.0 * tokens * model.mlp_params / t
        fc1_flops = mlp_flops * (model.mlp_matrices - 1) / model.mlp_matrices
        act_bytes = (2 * model.mlp_matrices) * tokens * f / t
    norm_bytes = 22.0 * tokens * h / (t if par.sequence_parallel else 1)
    elementwise = _mem(act_bytes + norm_bytes, hw, eff)

    gemm_fwd = _gemm(qkv_flops + proj_flops + mlp_flops, hw, eff)
    forward = gemm_fwd + core + elementwise + eff.kernel_overhead_s
    backward = 2.0 * (gemm_fwd + core + elementwise) + eff.kernel_overhead_s

    # -- communication ---------------------------------------------------------------------------------
    act = BYTES * tokens * h
    pairs = 1 if moe else 2  # collectives per direction in the TP group (attention, and dense MLP)
    column_fwd = _gemm(qkv_flops + (0.0 if moe else fc1_flops), hw, eff)
    if par.sequence_parallel:
        gather = comm.all_gather(hw, eff, par.tp_group, act).scaled(pairs)
        scatter = comm.reduce_scatter(hw, eff, par.tp_group, act).scaled(pairs)
        tp_fwd = Comm.zero(n_tiers).add(gather).add(scatter)
        # backward: the row-parallel outputs' gradients are gathered in the open; the column-parallel
        # inputs are re-gathered under dgrad and their gradients reduce-scattered under wgrad
        tp_bwd_exposed = gather.time
        hidden = Comm.zero(n_tiers).add(gather).add(scatter)
        tp_bwd_hidden = max(0.0, hidden.time - 2.0 * column_fwd)
        tp_bwd = Comm.zero(n_tiers).add(gather).add(hidden)
    else:
        tp_fwd = comm.all_reduce(hw, eff, par.tp_group, act).scaled(pairs)
        # backward: the column-parallel inputs' gradients are all-reduced under wgrad
        tp_bwd_exposed = 0.0
        tp_bwd_hidden = max(0.0, tp_fwd.time - column_fwd)
        tp_bwd = tp_fwd.scaled(1.0)
    a2a = Comm.zero(n_tiers)
    if moe and par.ep > 1:
        routed = BYTES * tokens / t * model.top_k * h * model.load_factor
        a2a = comm.all_to_all(hw, eff, par.ep_group, routed).scaled(2.0)  # dispatch + combine

    forward += tp_fwd.time + a2a.time
    backward += tp_bwd_exposed + tp_bwd_hidden + a2a.time

    traffic = Comm.zero(n_tiers).add(tp_fwd).add(tp_bwd).add(a2a).add(a2a)
    flops = 3.0 * (qkv_flops + proj_flops + mlp_flops + core_flops)
    passes = {"none": 3.0, "selective": 3.0, "full": 4.0}[par.recompute]  # forward-equivalents of work
    parts = {
        "gemm": passes * gemm_fwd,
        "attention": (passes + (par.recompute == "selective")) * core,
        "elementwise": passes * elementwise,
        "tp_comm": tp_fwd.time * (2.0 if par.recompute == "full" else 1.0) + tp_bwd_exposed + tp_bwd_hidden,
        "a2a": a2a.time * (3.0 if par.recompute == "full" else 2.0),
        "overhead": eff.kernel_overhead_s * (3.0 if par.recompute == "full" else 2.0),
        "experts": passes * _gemm(2.0 * rows * model.mlp_params, hw, eff) if moe else 0.0,
    }
    recompute = 0.0
    if par.recompute == "full":
        recompute = forward
        traffic.add(tp_fwd).add(a2a)
        flops += qkv_flops + proj_flops + mlp_flops + core_flops
    elif par.recompute == "selective":
        recompute = core
        flops += core_flops
    traffic.time = 0.0
    return BlockCost(
        forward=forward, backward=backward, recompute=recompute, traffic=traffic, flops=flops, parts=parts
    )


def logits_cost(model: ModelSpec, par: ParallelSpec, hw: Hardware, eff: Efficiency) -> float:
    """Output layer and cross-entropy (last stage) per micro-batch: GEMMs plus fp32 logits traffic."""
    tokens = par.micro_batch * model.seq_len
    gemm = 3.0 * _gemm(2.0 * tokens * model.hidden * model.vocab / par.tp, hw, eff)
    logits_bytes = 4.0 * tokens * model.vocab / par.tp
    return gemm + _mem(4.0 * logits_bytes, hw, eff) + 2 * eff.kernel_overhead_s


def embedding_cost(model: ModelSpec, par: ParallelSpec, hw: Hardware, eff: Efficiency) -> float:
    """Input embedding (first stage) per micro-batch: lookup traffic and its TP reduction."""
    act = BYTES * par.micro_batch * model.seq_len * model.hidden
    reduce = comm.all_reduce(hw, eff, par.tp_group, act).time
    return 3.0 * _mem(2 * act, hw, eff) + 2 * reduce
