"""The efficiency constants of the step-time model: few, physical, calibrated once.

A model that fits one constant per measurement predicts nothing. This one has seven numbers, each the
achieved fraction of a ceiling for one kind of work, the same for every model, mesh and row. Compute
fractions are of the unit's achievable matmul throughput (``UnitFigures.matmul_fraction`` x peak, the
measured MAMF), so they carry across devices; the others are of datasheet bandwidths.

Fitted (two numbers, once, by ``fit_efficiency`` in ``sim/validation.py`` over the nine dense rows of
Korthikanti et al. 2022 Table 5 and Narayanan et al. 2021 together, minimising the mean absolute error;
``benchmarks/sim_validation.py --fit`` reruns it):

``gemm``        dense 16-bit matrix multiplies (QKV, projections, MLP, experts, logits) inside a training
                step: 0.895 of MAMF, i.e. 77% of the A100's 312 TFLOP/s. Megatron's layer shapes are
                large and well aligned, so they land close to the ceiling.
``attention``   the unfused attention core of 2021-2022 Megatron: strided batched ``QK^T`` and
                ``softmax x V`` with ``d_head`` 96-160, plus the mask, scale and layout copies between
                them that the memory term does not count: 0.185 of MAMF for its ``4 b s^2 h / t`` FLOPs.

Set from outside measurements, not fitted:

``flash``       fused FlashAttention, forward plus backward, causal (half the score FLOPs): 0.55 of MAMF,
                the FlashAttention-2/cuDNN range for head dim 128 (Dao 2023 reports 50-73% of A100 peak).
``memory``      memory-bound element-wise kernels (norms, dropout, GeLU, softmax, optimizer) as a fraction
                of HBM bandwidth: 0.85, what streaming copies reach on A100/H100.
``scale_up`` /  NCCL bus bandwidth over link peak: 0.75 on NVLink (nccl-tests all_reduce on DGX A100
``scale_out``   reaches about 230 of 300 GB/s), 0.90 on InfiniBand (about 23 of 25 GB/s per HDR NIC).
``kernel_overhead_s``  launch and synchronisation cost per block and pass (forward, backward,
                recompute): about 40 kernels x 2 us on Megatron's code path; it matters only for small
                layers.
"""

from __future__ import annotations

from dataclasses import dataclass

from zetta_ray.errors import ConfigError

__all__ = ["CALIBRATED", "Efficiency"]


@dataclass(kw_only=True, slots=True, frozen=True)
class Efficiency:
    """Achieved fractions of peak (0 < x <= 1) for each kind of work; see the module docstring."""

    gemm: float
    attention: float
    flash: float = 0.55
    memory: float = 0.85
    scale_up: float = 0.75
    scale_out: float = 0.90
    kernel_overhead_s: float = 80e-6

    def __post_init__(self) -> None:
        for name in ("gemm", "attention", "flash", "memory", "scale_up", "scale_out"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise ConfigError(f"Efficiency.{name}={value!r} is invalid: must be a fraction in (0, 1]")
        if self.kernel_overhead_s < 0:
            raise ConfigError(f"Efficiency.kernel_overhead_s={self.kernel_overhead_s!r} must be >= 0")


# Fitted once by sim.validation.fit_efficiency (benchmarks/sim_validation.py --fit); never per row.
CALIBRATED = Efficiency(gemm=0.895, attention=0.185)
