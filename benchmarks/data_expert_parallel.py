"""An MoE model's training step: plain single-process PyTorch against ``zr.ExpertParallel(2)`` alone
(the dense part in this process) and against ``zr.DataParallel(2) x zr.ExpertParallel(2)`` (two dense
replicas on units, their MoE layers calling two shared expert units directly).

Same machine, same run, same data: ``zr.MoETransformer`` with ``--d-model`` (default 512), 2 layers of
4 experts (top-2, d_ff 2 x d_model), seq 128, ``--tokens`` tokens per step, AdamW. Plain PyTorch uses
``--threads`` torch threads; every unit one thread. ``--raylets 3`` runs the cluster as three raylets
on this machine (``ray.cluster_utils.Cluster``), so that the replicas, the expert units and the pools
sit on different nodes and every row crosses the object store between them.

What it reports, as one JSON object (medians over the measured steps, rounds rotating who goes first):

- ``<mesh>_ratio``: the mesh's step time / plain PyTorch's, on the same cores;
- ``<mesh>_controller_cpu_ratio``: this process's CPU seconds per step of that mesh (Ray's threads in
  this process included) / plain PyTorch's CPU seconds per step. The issue's goal for the mesh with
  data parallelism is <= 0.05; ``ExpertParallel`` alone shows where the controller stood before;
- ``<mesh>_controller_cpu_s_per_step_per_unit``: that CPU divided by the mesh's units.

    python benchmarks/data_expert_parallel.py [--d-model 512] [--tokens 2048] [--raylets 1]
"""

from __future__ import annotations

import json
import statistics

import ray
import torch
from steps import rotate, step_parser

import zetta_ray as zr

MESHES = {
    "expert2": lambda: (zr.ExpertParallel(degree=2),),
    "data2_expert2": lambda: (zr.DataParallel(degree=2), zr.ExpertParallel(degree=2)),
}
UNITS = {"expert2": 2, "data2_expert2": 4}


def _model(d_model: int) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = zr.MoEConfig(d_model=d_model, n_layers=2, n_heads=8, n_experts=4, top_k=2, d_ff=2 * d_model)
    return zr.MoETransformer(cfg)


def measure(d_model: int, tokens: int, steps: int, warmup: int, rounds: int, threads: int) -> dict:
    seq = 128
    g = torch.Generator().manual_seed(1)
    x, y = (torch.randint(0, 256, (tokens // seq, seq), generator=g) for _ in range(2))
    plain = _model(d_model)
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=1e-3)
    out: dict = {"benchmark": "data_expert_parallel", "d_model": d_model, "tokens_per_step": tokens}
    out["parameters"] = sum(p.numel() for p in plain.parameters())
    runtime = zr.RuntimeConfig(unit_num_cpus=0.25)  # every side shares the machine's cores
    for mesh, strategies in MESHES.items():
        dmodel = zr.parallelize(_model(d_model), *strategies(), runtime=runtime, checkpoint=False)
        try:
            sides = {
                "plain": (plain, plain_opt),
                mesh: (dmodel, dmodel.optimizer(torch.optim.AdamW, lr=1e-3)),
            }
            walls, cpus = rotate(sides, x, y, rounds=rounds, warmup=warmup, steps=steps, threads=threads)
            out[f"{mesh}_nodes"] = len({u.node_id for u in dmodel.units})  # nodes its units run on
        finally:
            dmodel.close()
        med = {k: statistics.median(v) for k, v in walls.items()}
        cpu = {k: statistics.median(v) for k, v in cpus.items()}
        out[f"{mesh}_plain_median_s"] = round(med["plain"], 4)
        out[f"{mesh}_median_s"] = round(med[mesh], 4)
        out[f"{mesh}_ratio"] = round(med[mesh] / med["plain"], 3)
        out[f"{mesh}_plain_cpu_s_per_step"] = round(cpu["plain"], 4)
        out[f"{mesh}_controller_cpu_s_per_step"] = round(cpu[mesh], 4)
        out[f"{mesh}_controller_cpu_ratio"] = round(cpu[mesh] / cpu["plain"], 4)
        out[f"{mesh}_controller_cpu_s_per_step_per_unit"] = round(cpu[mesh] / UNITS[mesh], 4)
        out["steps_measured"] = len(walls["plain"])
    return out


def main() -> None:
    parser = step_parser(__doc__, tokens=2048, steps=3)
    parser.add_argument("--raylets", type=int, default=1, help="raylets of the local cluster (default 1)")
    args = parser.parse_args()
    cluster = None
    if args.raylets > 1:
        from ray.cluster_utils import Cluster

        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
        for _ in range(args.raylets - 1):
            cluster.add_node(num_cpus=2)
        ray.init(address=cluster.address)
    try:
        result = measure(args.d_model, args.tokens, args.steps, args.warmup, args.rounds, args.threads)
        result["raylets"] = args.raylets
        print(json.dumps(result))
    finally:
        if cluster is not None:
            ray.shutdown()
            cluster.shutdown()


if __name__ == "__main__":
    main()
