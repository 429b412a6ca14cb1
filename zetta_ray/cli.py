"""The ``zetta-ray`` command: parses the arguments and wires each subcommand to the library.

    zetta-ray train [--config FILE.toml] [--steps N] [--seed S] [--address ADDR] [--metrics-json PATH]
    zetta-ray plan [--topology FILE | --address ADDR] [--config FILE.toml] [--tokens-per-step N]
                   [--zipf EXPONENT] [--replicas R] [--dense-units D] [--seed S] [--limit N] [--json PATH]
    zetta-ray simulate SPEC.toml [--json]
    zetta-ray chaos [--config FILE.toml] [--kill TARGET:STEP[:PHASE[:INDEX]]]... [--rate R]
                    [--nodes N | --address ADDR] [--json PATH]

``train`` runs ``zetta_ray.trainer.train``: an MoE transformer on the byte-level standard-library corpus,
with a progress bar on stderr and a one-line summary on stdout. Settings come from the dataclass
defaults, then the TOML file (``zetta_ray.runconfig.load_config``: tables ``[model]``, ``[train]``,
``[runtime]`` map onto ``zr.MoEConfig``, ``zr.TrainConfig`` and ``zr.RuntimeConfig``), then the
command-line flags. Each subcommand is a ``_cmd_<name>`` function with an ``_add_<name>`` that registers
its flags in ``build_parser``.

``plan`` places the experts of the ``[model]`` in ``--config`` with ``zetta_ray.placement.place`` on a
synthetic machine (``--topology FILE``, no cluster needed) or on the live Ray cluster, and prints the
plan as a table (``zetta_ray.placement.report``); ``--json PATH`` writes all of it. ``simulate`` runs
``zetta_ray.sim`` on a spec file (see docs/simulator.md). ``chaos`` runs the train job without and with
injected faults (units, memory pools or nodes killed) and reports the recoveries and whether the final
state is bit-identical (docs/recovery.md).

Ray: ``train`` and ``chaos`` start or join a cluster; ``plan`` without ``--topology`` joins one to read
its nodes.

Errors that zetta_ray raises on purpose (``ZettaError``, including ``ConfigError``) end the command with a
one-line message and exit status 2 (configuration) or 1 (anything else), never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import ray
from tqdm import tqdm

import zetta_ray as zr
from zetta_ray.chaos import Chaos, parse_kill
from zetta_ray.chaos_run import chaos_cluster, chaos_report, check_kills, format_chaos
from zetta_ray.errors import ConfigError, ZettaError
from zetta_ray.placement import InfeasiblePlacementError, PlacerConfig, Topology, Workload, place, zipf_load
from zetta_ray.placement.replicas import default_replicas
from zetta_ray.placement.report import format_plan, plan_document
from zetta_ray.runconfig import load_config
from zetta_ray.sim import main_simulate
from zetta_ray.trainer import StepMetrics, train

__all__ = ["build_parser", "main"]

# -- train ------------------------------------------------------------------------------------------------


def _cmd_train(args: argparse.Namespace) -> int:
    cfg = load_config(
        args.config,
        steps=args.steps,
        seed=args.seed,
        data_dir=args.data_dir,
        checkpoint_dir=args.checkpoint_dir,
        checkpoint_every=args.checkpoint_every,
        pool_bytes=args.pool_bytes,
        data_parallel=args.data_parallel,
        pipeline_stages=args.pipeline_stages,
        microbatches=args.microbatches,
    )
    t, m = cfg.train, cfg.model
    _err(
        f"zetta-ray train: {t.steps} steps, batch {t.batch_size} x {m.seq_len} tokens, d_model {m.d_model}, "
        f"{m.n_layers} layers x {m.n_experts} experts over {t.expert_degree} units"
        + (f", {t.data_parallel} dense replicas" if t.data_parallel > 1 else "")
        + f", seed {t.seed}"
    )
    bars: list[tqdm] = []  # made at the first step, so its rate ignores cluster and actor start-up

    def on_step(step: StepMetrics) -> None:
        if not bars:
            bars.append(tqdm(total=t.steps, file=sys.stderr, unit="step", dynamic_ncols=True))
        bars[0].set_postfix(loss=f"{step.loss:.3f}", tok_s=f"{step.tokens_per_s:,.0f}", refresh=False)
        bars[0].update(1)

    try:
        result = train(
            cfg.model,
            cfg.train,
            cfg.runtime,
            address=args.address,
            on_step=on_step,
            log=_err_above_bar,
            resume=args.resume,
        )
    finally:
        for bar in bars:
            bar.close()
    if args.metrics_json:
        _write_json(args.metrics_json, result.to_dict())
    print(result.summary() + (f"; metrics in {args.metrics_json}" if args.metrics_json else ""))
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train an MoE transformer on the standard-library corpus",
        description="Train zr.MoETransformer with its experts on Ray actors. Flags override --config.",
    )
    p.add_argument("--config", metavar="FILE.toml", help="TOML with [model], [train], [runtime] tables")
    p.add_argument("--steps", type=int, help="optimizer steps (TrainConfig.steps)")
    p.add_argument("--seed", type=int, help="seed for weights and data order (TrainConfig.seed)")
    p.add_argument("--data-dir", help="corpus directory (TrainConfig.data_dir; default: a cache dir)")
    p.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else a local cluster)")
    p.add_argument("--metrics-json", metavar="PATH", help="write per-step loss, step time, tokens/s, config")
    p.add_argument(
        "--checkpoint-dir", metavar="URI", help="durable checkpoints here (a path, s3://, gs://, hdfs://)"
    )
    p.add_argument("--checkpoint-every", type=int, help="steps between durable checkpoints (default 100)")
    p.add_argument(
        "--pool-bytes", type=int, help="snapshot bytes each node's MemoryPool holds (default 2 GiB)"
    )
    p.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint in --checkpoint-dir"
    )
    p.add_argument(
        "--data-parallel", type=int, metavar="D", help="dense replicas sharing the expert units (default 1)"
    )
    p.add_argument("--pipeline-stages", type=int, metavar="P", help="pipeline stages (dense models only)")
    p.add_argument("--microbatches", type=int, metavar="M", help="micro-batches per pipeline step (2P)")
    p.set_defaults(func=_cmd_train)


# -- chaos ------------------------------------------------------------------------------------------------


def _cmd_chaos(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, steps=args.steps, seed=args.seed, data_dir=args.data_dir)
    kills = [parse_kill(k) for k in args.kill or []]
    degree = cfg.train.expert_degree
    replicas = cfg.train.data_parallel if cfg.train.data_parallel > 1 else 0
    check_kills(kills, args.rate, degree, replicas)
    targets = args.targets.split(",")
    with ExitStack() as stack:
        wants_nodes = any(k.target == "node" for k in kills) or ("node" in targets and args.rate > 0)
        address, kill_node, setting = chaos_cluster(
            stack, address=args.address, nodes=args.nodes, wants_nodes=wants_nodes, degree=replicas + degree
        )
        monkey = Chaos(kills, rate=args.rate, seed=args.chaos_seed, targets=targets, kill_node=kill_node)
        _err(f"zetta-ray chaos on {setting}: a fault-free run of {cfg.train.steps} steps, then under chaos")
        clean = train(cfg.model, cfg.train, cfg.runtime, address=address, log=_err_above_bar, val_batches=0)
        step_ends: list[float] = []
        faulty = train(
            cfg.model,
            cfg.train,
            cfg.runtime,
            address=address,
            log=_err_above_bar,
            val_batches=0,
            chaos=monkey,
            on_step=lambda _m: step_ends.append(time.perf_counter()),
        )
    report = chaos_report(setting, monkey, clean, faulty, step_ends)
    print(format_chaos(monkey, faulty, report))
    if args.json:
        _write_json(args.json, report)
    return 0 if report["bitwise_identical"] else 1


def _add_chaos(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "chaos",
        help="train under injected faults and compare with a fault-free run",
        description=(
            "Run the train job twice, without and with faults (units, memory pools or nodes killed at a "
            "step and phase, or at random), and report faults, recoveries, time to recover, steps redone, "
            "and whether the final state is bit-identical. Exit 1 if it is not. A node kill needs several "
            "nodes: --nodes N starts them here (and removes the victim), --address joins a cluster (and "
            "SIGKILLs the victim's raylet). The driver's node is never killed."
        ),
    )
    p.add_argument("--config", metavar="FILE.toml", help="as for train")
    p.add_argument("--steps", type=int, help="optimizer steps")
    p.add_argument("--seed", type=int, help="seed for weights and data order")
    p.add_argument("--data-dir", help="corpus directory")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--address", help="Ray cluster to join (node kills SIGKILL the node's raylet)")
    where.add_argument(
        "--nodes",
        type=int,
        metavar="N",
        help="start a local cluster here: a head node (the driver) and N worker nodes that hold the units, "
        "health checks every 0.5 s (node kills remove a worker node)",
    )
    p.add_argument(
        "--kill",
        action="append",
        metavar="TARGET:STEP[:PHASE[:INDEX]]",
        help="e.g. unit:3:backward:1, pool:5 or node:2:forward:0 (the node of unit 0); repeatable; PHASE "
        "is forward, backward or optimizer",
    )
    p.add_argument("--rate", type=float, default=0.0, help="probability of a random kill per step and phase")
    p.add_argument("--chaos-seed", type=int, default=0, help="seed of the random kills")
    p.add_argument("--targets", default="unit", help="what random kills hit: unit,pool,node")
    p.add_argument("--json", metavar="PATH", help="write the report as JSON")
    p.set_defaults(func=_cmd_chaos)


# -- plan -------------------------------------------------------------------------------------------------


_FLAG_HINT = (
    "(zetta-ray plan flags: --replicas sets Workload.replicas, --dense-units Workload.n_dense; "
    "--tokens-per-step and the [model] table of --config size the experts)"
)


def _plan_topology(args: argparse.Namespace) -> Topology:
    if args.topology is not None:
        return Topology.from_file(args.topology)
    zr.init(args.address)
    return Topology.from_ray_nodes(ray.nodes(), name="ray-cluster")


def _plan_workload(args: argparse.Namespace, topology: Topology) -> Workload:
    cfg = load_config(args.config)
    tokens = args.tokens_per_step
    if tokens is None:
        tokens = cfg.train.batch_size * cfg.model.seq_len  # what one `zetta-ray train` step routes
    load = zipf_load(cfg.model.n_experts, args.zipf, seed=args.seed) if args.zipf else None
    replicas = default_replicas(topology) if args.replicas is None else args.replicas
    return Workload.from_moe_config(
        cfg.model, tokens_per_step=tokens, load=load, replicas=replicas, n_dense=args.dense_units
    )


def _cmd_plan(args: argparse.Namespace) -> int:
    topology = _plan_topology(args)
    workload = _plan_workload(args, topology)
    try:
        plan = place(topology, workload, PlacerConfig(seed=args.seed))
    except InfeasiblePlacementError as e:
        raise InfeasiblePlacementError(f"{e} {_FLAG_HINT}") from e
    doc = plan_document(topology, workload, plan, zipf=args.zipf)
    if args.json:
        _write_json(args.json, doc)
    print(format_plan(doc, limit=args.limit) + (f"\n  plan written to {args.json}" if args.json else ""))
    return 0


def _add_plan(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        help="place the experts on a synthetic machine or the live cluster and print the plan",
        description="Place the experts, dense units and snapshot replicas of the [model] in --config with "
        "zetta_ray.placement.place, and print where each expert goes, the bytes per step on each of its "
        "links and the predicted step time against round-robin. Infeasible plans exit 1 with the reason.",
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--topology", metavar="FILE", help="synthetic machine spec (.toml or .json); no cluster"
    )
    where.add_argument(
        "--address", help="Ray cluster to plan on (default: RAY_ADDRESS, else a local cluster)"
    )
    p.add_argument("--config", metavar="FILE.toml", help="TOML whose [model] table is the zr.MoEConfig")
    p.add_argument(
        "--tokens-per-step",
        type=int,
        metavar="N",
        help="routed tokens per step (default: batch_size x seq_len)",
    )
    p.add_argument(
        "--zipf",
        type=float,
        metavar="EXPONENT",
        help="skewed expert load ~ 1/rank^EXPONENT (default: uniform)",
    )
    p.add_argument(
        "--replicas",
        type=int,
        metavar="R",
        help="snapshot replicas per expert (default: as many as the failure domains allow, up to 2; "
        "0 on one node)",
    )
    p.add_argument("--dense-units", type=int, default=1, metavar="D", help="dense/router units (default 1)")
    p.add_argument("--seed", type=int, default=0, help="placer tie-breaks and the Zipf shuffle (default 0)")
    p.add_argument("--limit", type=int, default=64, metavar="N", help="experts to print (default 64; 0: all)")
    p.add_argument("--json", metavar="PATH", help="write the whole plan as JSON")
    p.set_defaults(func=_cmd_plan)


# -- simulate ---------------------------------------------------------------------------------------------


def _cmd_simulate(args: argparse.Namespace) -> int:
    return main_simulate(args.spec, as_json=args.json)


def _add_simulate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "simulate",
        help="predict step time, memory, MFU and goodput of a model on a simulated machine",
        description="Run the zettascale simulator (zetta_ray.sim) on a spec file; see docs/simulator.md.",
    )
    p.add_argument("spec", metavar="SPEC.toml", help="simulator spec: [model], [hardware], [parallel] ...")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    p.set_defaults(func=_cmd_simulate)


# -- entry point ------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zetta-ray",
        description="zetta_ray: train Mixture-of-Experts models with every expert a Ray actor",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train(sub)
    _add_plan(sub)
    _add_simulate(sub)
    _add_chaos(sub)
    return parser


def _write_json(path: str, data: Any) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1) + "\n")


def _err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _err_above_bar(message: str) -> None:
    tqdm.write(message, file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        _err(f"zetta-ray {args.command}: error: {' '.join(str(e).split())}")
        return 2
    except ZettaError as e:
        _err(f"zetta-ray {args.command}: error: {type(e).__name__}: {' '.join(str(e).split())}")
        return 1
    except KeyboardInterrupt:
        _err(f"zetta-ray {args.command}: interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
