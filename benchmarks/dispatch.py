"""The cost of one remote expert call through zetta_ray against a bare Ray actor call.

Both sides run the same expert (an FFN, d_model=512, d_ff=2048, one torch thread) on the same numpy
payload and return numpy: the bare side is a minimal Ray actor with one method; the zetta_ray side is
``ExpertRuntime.forward`` of a one-unit DistributedModule (keyed call, deadline, combine), twice: as
it runs here, with the unit on the controller's node reading and writing rows in shared memory
(``ratio``), and with ``RuntimeConfig(shared_memory=False)``, the object-store path that units on other
nodes take, as the bare call does (``ratio_object_store``). Prints one JSON object per payload size
with median latencies and the ratios (zetta_ray / bare; 1.0 = no overhead). The three sides take
turns call by call (the order rotated every round), so a change in the machine's load hits them alike.

    python benchmarks/dispatch.py [--calls 300] [--warmup 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import ray
import torch

import zetta_ray as zr

D_MODEL, D_FF = 512, 2048


@ray.remote(num_cpus=0)
class BareExpert:
    def __init__(self, state: dict[str, np.ndarray]):
        torch.set_num_threads(1)
        self.expert = zr.ExpertFFN(D_MODEL, D_FF)
        self.expert.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})

    @torch.no_grad()
    def forward(self, x_ND: np.ndarray) -> np.ndarray:
        return self.expert(torch.from_numpy(x_ND)).numpy()


class OneExpert(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.moe = zr.MoELayer(D_MODEL, D_FF, n_experts=1, top_k=1)


def _interleaved_median_ms(fns, calls: int, warmup: int) -> list[float]:
    """Median milliseconds per call of each of ``fns``, called in turn (one call of each per round, the
    order rotated every round) so that the machine's load changes hit every side alike."""
    times: list[list[float]] = [[] for _ in fns]
    for i in range(warmup + calls):
        for j in range(len(fns)):
            side = (i + j) % len(fns)
            start = time.perf_counter()
            fns[side]()
            if i >= warmup:
                times[side].append(time.perf_counter() - start)
    return [1e3 * statistics.median(t) for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    args = parser.parse_args()
    zr.init()
    torch.manual_seed(0)
    module = OneExpert()
    state = {k: v.numpy().copy() for k, v in module.moe.experts[0].state_dict().items()}
    bare = BareExpert.remote(state)
    dmodel = zr.parallelize(module, zr.ExpertParallel(degree=1))
    torch.manual_seed(0)
    via_store = zr.parallelize(  # the same expert (same seed), a module of its own
        OneExpert(),
        zr.ExpertParallel(degree=1),
        runtime=zr.RuntimeConfig(shared_memory=False),
        checkpoint=False,
    )
    runtime, store_runtime = dmodel.runtime, via_store.runtime
    try:
        for rows in (16, 256, 2048):
            x_ND = torch.randn(rows, D_MODEL)
            x_np = x_ND.numpy()
            expected = ray.get(bare.forward.remote(x_np))  # same work on every side
            assert np.array_equal(expected, runtime.forward(0, x_ND, [rows], keep=False)[0].numpy())
            assert np.array_equal(expected, store_runtime.forward(0, x_ND, [rows], keep=False)[0].numpy())
            bare_ms, zr_ms, store_ms = _interleaved_median_ms(
                [
                    lambda x_np=x_np: ray.get(bare.forward.remote(x_np)),
                    lambda x_ND=x_ND, rows=rows: runtime.forward(0, x_ND, [rows], keep=False),
                    lambda x_ND=x_ND, rows=rows: store_runtime.forward(0, x_ND, [rows], keep=False),
                ],
                args.calls,
                args.warmup,
            )
            print(
                json.dumps(
                    {
                        "benchmark": "dispatch",
                        "rows": rows,
                        "payload_bytes": int(x_np.nbytes),
                        "bare_ray_ms": round(bare_ms, 3),
                        "zetta_ray_ms": round(zr_ms, 3),
                        "ratio": round(zr_ms / bare_ms, 3),
                        "zetta_ray_object_store_ms": round(store_ms, 3),
                        "ratio_object_store": round(store_ms / bare_ms, 3),
                    }
                ),
                flush=True,
            )
    finally:
        dmodel.close()
        via_store.close()
        ray.kill(bare)


if __name__ == "__main__":
    main()
