"""``parallel = "auto"``: search the mesh for the fastest predicted step that fits in memory.

The space is every tensor degree that divides the heads and stays inside one NVLink domain, every
pipeline degree that divides the layers, every expert degree that divides the experts, micro-batches
of 1, 2, 4 or 8 sequences and interleaving depths up to 8; the data degree is the largest that fits
the machine and the expert layout. Two choices are settled by dominance rather than search, because
in this model they only ever help or only ever cost:

* recomputation: ``none`` is faster than ``selective``, which is faster than ``full``, and nothing
  else depends on it, so for each mesh the first of them that fits is the best;
* the distributed optimizer (``zero1``) needs less memory and moves fewer bytes (a 4-byte
  reduce-scatter plus a 2-byte all-gather against a 4-byte all-reduce), so it is always on.

Sequence parallelism is on whenever tp > 1 (same bytes on the wire, a t-th of the activations).
The score is seconds per sequence (step time over the realised global batch), so meshes whose replica
count rounds the batch differently compare fairly. Units the chosen mesh leaves idle are spares.
Candidates are checked for memory first, which is cheap, and only those that fit are timed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from zetta_ray.errors import ConfigError
from zetta_ray.model_spec import ModelSpec
from zetta_ray.sim.calibration import Efficiency
from zetta_ray.sim.hardware import Hardware
from zetta_ray.sim.memory import memory_per_unit
from zetta_ray.sim.parallel import RECOMPUTE, ParallelSpec
from zetta_ray.sim.spec import DoesNotFitError, SearchSpec
from zetta_ray.sim.step import StepReport, step

__all__ = ["SearchResult", "search"]

MICRO_BATCHES = (1, 2, 4, 8)
MAX_VIRTUAL = 8


@dataclass(kw_only=True, slots=True)
class SearchResult:
    """The chosen mesh, its predicted step, and how much of the space was looked at."""

    parallel: ParallelSpec
    report: StepReport
    evaluated: int
    fitted: int
    units_used: int
    spare_units: int


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def _candidates(model: ModelSpec, hw: Hardware, opts: SearchSpec):
    """Yield ParallelSpec keyword sets (without recompute) in a deterministic order."""
    units = hw.units
    target = opts.global_batch or units
    tps = [t for t in _divisors(hw.domain(0)) if model.heads % t == 0 and model.f % t == 0]
    eps = _divisors(model.n_experts) if model.kind == "moe" else [1]
    for tp in tps:
        for pp in _divisors(model.layers):
            max_dp = units // (tp * pp)
            if max_dp < 1:
                continue
            lps = model.layers // pp
            vs = [v for v in _divisors(lps) if v <= MAX_VIRTUAL] if pp > 1 else [1]
            for ep in eps:
                stride = ep // math.gcd(ep, tp)
                dp = (max_dp // stride) * stride
                if dp < 1 or tp * pp * dp < opts.min_utilization * units:
                    continue
                for mb in MICRO_BATCHES:
                    if dp * mb > 1.5 * target:
                        continue
                    m = max(1, round(target / (dp * mb)))
                    for v in vs:
                        if v > 1 and m % pp:
                            continue
                        yield {
                            "tp": tp, "pp": pp, "dp": dp, "ep": ep, "virtual_stages": v, "micro_batch": mb,
                            "global_batch": m * dp * mb, "sequence_parallel": tp > 1, "zero1": True,
                            "overlap_comm": opts.overlap_comm,
                        }  # fmt: skip


def search(model: ModelSpec, hw: Hardware, opts: SearchSpec, eff: Efficiency) -> SearchResult:
    """The fastest mesh (seconds per sequence) that fits; ``DoesNotFitError`` if none does."""
    best: tuple[float, ParallelSpec, StepReport] | None = None
    evaluated = fitted = 0
    for kw in _candidates(model, hw, opts):
        for recompute in RECOMPUTE:
            evaluated += 1
            try:
                par = ParallelSpec(recompute=recompute, **kw)
            except ConfigError:
                break
            if memory_per_unit(model, par).total > hw.unit.hbm_bytes:
                continue
            fitted += 1
            used = hw.with_(units=par.units) if par.units != hw.units else hw
            report = step(model, par, used, eff, check=False)
            score = report.step_time_s / par.global_batch
            if best is None or score < best[0]:
                best = (score, par, report)
            break  # a lighter recomputation fitted: heavier ones are only slower
    if best is None:
        raise DoesNotFitError(
            f"no mesh fits {model.total_params / 1e12:.2f}T parameters on {hw.units} x {hw.unit.name} "
            f"({hw.unit.hbm_bytes / 1e9:.0f} GB each) using at least {opts.min_utilization:.0%} of the units "
            f"({evaluated} candidates tried). Add units, lower search.min_utilization, or shrink the model"
        )
    _, par, report = best
    return SearchResult(
        parallel=par,
        report=report,
        evaluated=evaluated,
        fitted=fitted,
        units_used=par.units,
        spare_units=hw.units - par.units,
    )
