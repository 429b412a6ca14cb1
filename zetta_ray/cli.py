"""The ``zetta-ray`` command.

    zetta-ray train [--config FILE.toml] [--steps N] [--seed S] [--address ADDR] [--metrics-json PATH]
    zetta-ray plan [--topology FILE | --address ADDR] [--config FILE.toml] [--tokens-per-step N]
                   [--zipf EXPONENT] [--replicas R] [--dense-units D] [--seed S] [--limit N] [--json PATH]
    zetta-ray simulate SPEC.toml [--json]
    zetta-ray chaos [--config FILE.toml] [--kill TARGET:STEP[:PHASE[:INDEX]]]... [--rate R]
                    [--nodes N | --address ADDR] [--json PATH]

``train`` runs ``zetta_ray.trainer.train``: an MoE transformer on the byte-level standard-library corpus,
with a progress bar on stderr and a one-line summary on stdout. Settings come from the dataclass
defaults, then the TOML file (tables ``[model]``, ``[train]``, ``[runtime]`` map onto ``zr.MoEConfig``,
``zr.TrainConfig`` and ``zr.RuntimeConfig``), then the command-line flags. Each subcommand is a
``_cmd_<name>`` function registered in ``build_parser``.

``plan`` places the experts of the ``[model]`` in ``--config`` with ``zetta_ray.placement.place`` on a
synthetic machine (``--topology FILE``, no cluster needed) or on the live Ray cluster, and prints the
plan as a table; ``--json PATH`` writes all of it. ``simulate`` runs ``zetta_ray.sim`` on a spec file
(see docs/simulator.md). ``chaos`` runs the train job without and with injected faults (units, memory
pools or nodes killed) and reports the recoveries and whether the final state is bit-identical
(docs/recovery.md).

Errors that zetta_ray raises on purpose (``ZettaError``, including ``ConfigError``) end the command with a
one-line message and exit status 2 (configuration) or 1 (anything else), never a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import types
import typing
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
from tqdm import tqdm

import zetta_ray as zr
from zetta_ray.chaos import Chaos, ClusterNodeKiller, Kill, RayletKiller, local_cluster, parse_kill
from zetta_ray.config import MoEConfig, RuntimeConfig, TrainConfig, from_mapping
from zetta_ray.errors import ConfigError, ZettaError
from zetta_ray.placement import (
    InfeasiblePlacementError,
    Placement,
    PlacerConfig,
    Tier,
    Topology,
    Workload,
    place,
    round_robin,
    zipf_load,
)
from zetta_ray.placement.cost import TOKENS
from zetta_ray.sim import main_simulate
from zetta_ray.trainer import StepMetrics, train

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "RunConfig",
    "build_parser",
    "default_replicas",
    "format_plan",
    "load_config",
    "main",
    "plan_document",
]

_TABLES: dict[str, type] = {"model": MoEConfig, "train": TrainConfig, "runtime": RuntimeConfig}


@dataclass(frozen=True, kw_only=True, slots=True)
class RunConfig:
    """The three configs of one ``zetta-ray train`` run."""

    model: MoEConfig
    train: TrainConfig
    runtime: RuntimeConfig


def _check_types(cls: type, table: str, values: dict[str, Any]) -> None:
    """Reject TOML values of the wrong type, naming the key, the value and the type it must have."""
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        want = hints.get(key)
        if want is None:
            continue  # an unknown key: from_mapping names it
        allowed = typing.get_args(want) if isinstance(want, types.UnionType) else (want,)
        if float in allowed:
            allowed = (*allowed, int)  # TOML writes 1 for 1.0
        if isinstance(value, bool) and bool not in allowed or not isinstance(value, allowed):
            names = " or ".join(t.__name__ for t in allowed if t is not type(None))
            raise ConfigError(
                f"[{table}] {key} = {value!r} is a {type(value).__name__}; {cls.__name__}.{key} takes {names}"
            )


def load_config(path: str | Path | None = None, **train_overrides: Any) -> RunConfig:
    """Defaults, then the TOML file at ``path``, then ``train_overrides`` (``None`` values ignored).

    Unknown tables and unknown keys are errors that name them; so are values of the wrong type.
    """
    tables: dict[str, Any] = {}
    if path is not None:
        try:
            tables = tomllib.loads(Path(path).read_text())
        except OSError as e:
            raise ConfigError(f"--config {str(path)!r}: cannot read it ({e.strerror})") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"--config {str(path)!r} is not valid TOML: {e}") from None
    unknown = sorted(k for k in tables if k not in _TABLES)
    if unknown:
        raise ConfigError(
            f"unknown table(s) or top-level key(s) {unknown} in {str(path)!r}; the file may hold only the "
            f"tables {sorted(f'[{t}]' for t in _TABLES)}"
        )
    not_tables = sorted(k for k, v in tables.items() if not isinstance(v, dict))
    if not_tables:
        raise ConfigError(f"{not_tables} in {str(path)!r} must be tables, written [name] on their own line")
    overrides = {k: v for k, v in train_overrides.items() if v is not None}
    tables["train"] = {**tables.get("train", {}), **overrides}
    built = {}
    for name, cls in _TABLES.items():
        values = tables.get(name, {})
        _check_types(cls, name, values)
        built[name] = from_mapping(cls, values, name)
    return RunConfig(**built)


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
    )
    t, m = cfg.train, cfg.model
    _err(
        f"zetta-ray train: {t.steps} steps, batch {t.batch_size} x {m.seq_len} tokens, d_model {m.d_model}, "
        f"{m.n_layers} layers x {m.n_experts} experts over {t.expert_degree} units, seed {t.seed}"
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
    p.set_defaults(func=_cmd_train)


# -- chaos ------------------------------------------------------------------------------------------------


def _node_killer(
    args: argparse.Namespace, kills: list[Kill], targets: list[str], stack: ExitStack, degree: int
) -> tuple[str | None, Any, str]:
    """Where the chaos runs (an address for ``train``), what kills a node, and a label for the report.

    ``--nodes N`` starts a local multi-node cluster and removes its nodes; ``--address`` (or
    ``RAY_ADDRESS``) joins a cluster and SIGKILLs a node's raylet; a node kill on an embedded single-node
    cluster is refused."""
    wants_nodes = any(k.target == "node" for k in kills) or ("node" in targets and args.rate > 0)
    address = args.address or os.environ.get("RAY_ADDRESS")
    if args.nodes is not None:  # argparse keeps --nodes and --address apart
        if args.nodes < 1:
            raise ConfigError(f"--nodes {args.nodes} is invalid: give the number of worker nodes, >= 1")
        per = math.ceil(degree / args.nodes)  # every unit fits on the workers, none on the head
        cluster = stack.enter_context(local_cluster(args.nodes, units={"npu": per}, cpus_per_worker=per))
        setting = f"a local cluster: a head node (the driver), {args.nodes} worker node(s) of {per} npu each"
        return cluster.address, ClusterNodeKiller(cluster), setting
    if not wants_nodes:
        return args.address, None, f"the cluster at {address}" if address else "an embedded local cluster"
    if not address and not ray.is_initialized():
        raise ConfigError(
            "a node kill needs several nodes, but without --address this runs on an embedded single-node "
            "cluster; add --nodes N to start a local cluster of N worker nodes, or --address ADDR to "
            "join a multi-node cluster"
        )
    zr.init(args.address)
    where = ray.get_runtime_context().gcs_address
    alive = [n for n in ray.nodes() if n["Alive"]]
    if len(alive) < 2:
        raise ConfigError(
            f"a node kill needs a node other than the driver's, but the cluster at {where} has "
            f"{len(alive)} live node; add nodes, or use --nodes N for a local multi-node cluster"
        )
    return args.address, RayletKiller(), f"the cluster at {where} ({len(alive)} live nodes)"


def _kill_to_next_step(injected_at: list[float], step_ends: list[float]) -> list[float | None]:
    """For each fault: seconds from its injection to the end of the next completed step."""
    return [next((round(t - at, 3) for t in step_ends if t > at), None) for at in injected_at]


def _cmd_chaos(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, steps=args.steps, seed=args.seed, data_dir=args.data_dir)
    kills = [parse_kill(k) for k in args.kill or []]
    if not kills and not args.rate:
        raise ConfigError("zetta-ray chaos needs faults: --kill TARGET:STEP[:PHASE[:INDEX]] or --rate R")
    degree = cfg.train.expert_degree
    for k in kills:
        if k.target in ("unit", "node") and k.index >= degree:
            raise ConfigError(
                f"--kill {k.target}:{k.step}:{k.phase}:{k.index}: the run has {degree} compute units "
                f"(expert_degree); use an INDEX in 0..{degree - 1}"
            )
    targets = args.targets.split(",")
    with ExitStack() as stack:
        address, kill_node, setting = _node_killer(args, kills, targets, stack, degree)
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
    lost = [r["step"] - r["restored_step"] for r in faulty.recoveries]
    times = sorted(r["recovery_s"] for r in faulty.recoveries)
    report = {
        "cluster": setting,
        "faults_injected": monkey.injected,
        "recoveries": faulty.recoveries,
        "time_to_recover_s": {
            "p50": times[len(times) // 2] if times else None,
            "max": times[-1] if times else None,
        },
        "kill_to_next_step_s": _kill_to_next_step(monkey.injected_at, step_ends),
        "steps_redone": {"max": max(lost, default=0), "each": lost},
        "fault_free_sha256": clean.state_sha256,
        "chaos_sha256": faulty.state_sha256,
        "bitwise_identical": clean.state_sha256 == faulty.state_sha256,
        "wall_time_s": {"fault_free": clean.wall_time_s, "chaos": faulty.wall_time_s},
    }
    for f in monkey.injected:
        print(f"injected: {f}")
    for r in faulty.recoveries:
        print(
            f"recovered: unit {r['unit']} ({r['kind']} in {r['phase']} at step {r['step']}) by "
            f"{r['action']} on node {(r['node'] or '?')[:12]} from snapshot {r['restored_step']} "
            f"({r['redone_records']} gradient records redone) in {r['recovery_s']:.2f} s, "
            f"{r['replayed_calls']} calls replayed"
        )
    verdict = "IDENTICAL" if report["bitwise_identical"] else "DIFFERS"
    print(
        f"{len(monkey.injected)} fault(s), {len(faulty.recoveries)} recovery(ies), steps redone "
        f"{report['steps_redone']['max']}; final state {verdict} to the fault-free run "
        f"({faulty.state_sha256[:16]})"
    )
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

#: Snapshot replicas per expert that ``plan`` asks for at most when ``--replicas`` is not given.
MAX_DEFAULT_REPLICAS = 2


def default_replicas(topology: Topology) -> int:
    """Snapshot replicas per expert when ``--replicas`` is not given: as many as any expert can have, up to 2.

    A replica never shares its expert's node (nor its rack when the memory pools span racks), so the
    count is the pool nodes outside the fullest rack (or, with one rack, the pool nodes but one), capped
    at ``MAX_DEFAULT_REPLICAS``: 0 on a single node, 1 on two nodes, 2 from three nodes on. Every unit
    stays eligible for experts, whatever its rack.
    """
    t = topology
    pool_nodes = np.unique(t.pool_node_P)
    if len(np.unique(t.pool_rack_P)) > 1:
        room = len(pool_nodes) - int(np.bincount(t.node_rack_N[pool_nodes]).max())
    else:
        room = len(pool_nodes) - 1
    return max(0, min(MAX_DEFAULT_REPLICAS, room))


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


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _link_tiers(topology: Topology, plan: Placement) -> list[dict[str, Any]]:
    """Per link tier that carries bytes: its bandwidth and latency, and the plan's bytes per step on it."""
    e = plan.cost.edges
    rows = []
    for tier in Tier:
        mine = e.tier_Y == tier
        if not mine.any():
            continue
        tokens = mine & (e.kind_Y == TOKENS)
        rows.append(
            {
                "tier": tier.name,
                "bandwidth_bytes_per_s": _finite(topology.links.bandwidth_T[tier]),
                "latency_s": float(topology.links.latency_T[tier]),
                "edges": int(mine.sum()),
                "token_bytes": float(e.bytes_Y[tokens].sum()),
                "snapshot_bytes": float(e.bytes_Y[mine & ~tokens].sum()),
            }
        )
    return rows


def _round_robin(topology: Topology, workload: Workload) -> dict[str, Any]:
    try:
        rr = round_robin(topology, workload)
    except InfeasiblePlacementError as e:
        return {"error": " ".join(str(e).split())}
    return {"step_time_s": rr.step_time_s, "cost": rr.cost.to_dict()}


def _workload_summary(w: Workload, zipf: float | None) -> dict[str, Any]:
    return {
        "n_layers": w.n_layers,
        "n_experts": w.n_experts,
        "top_k": w.top_k,
        "d_model": w.d_model,
        "d_ff": w.d_ff,
        "tokens_per_step": w.tokens_per_step,
        "load": f"zipf exponent {zipf:g}" if zipf else "uniform",
        "n_dense": w.n_dense,
        "replicas": w.replicas,
        "snapshot_bytes": w.snapshot_bytes,
        "max_expert_memory_bytes": float(w.memory_X.max()),
    }


def plan_document(
    topology: Topology, workload: Workload, plan: Placement, *, zipf: float | None = None
) -> dict[str, Any]:
    """What ``zetta-ray plan --json`` writes: ``Placement.to_dict`` (method, seed, topology summary, cost,
    dense units, one row per expert with its links), the workload, bytes per link tier, and the
    round-robin baseline's predicted step time (or why it cannot place the workload)."""
    baseline = _round_robin(topology, workload)
    doc = plan.to_dict(topology, workload)
    doc.update(
        step_time_s=plan.step_time_s,
        workload=_workload_summary(workload, zipf),
        link_tiers=_link_tiers(topology, plan),
        round_robin=baseline,
    )
    if "step_time_s" in baseline:
        doc["speedup_vs_round_robin"] = baseline["step_time_s"] / plan.step_time_s
    return doc


def _bytes(n: float) -> str:
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {prefix}B"
    return f"{n:.3g} B"


def _secs(s: float) -> str:
    if s == 0:
        return "0 s"
    for scale, unit in ((1.0, "s"), (1e-3, "ms"), (1e-6, "us")):
        if s >= scale:
            return f"{s / scale:.3g} {unit}"
    return f"{s / 1e-9:.3g} ns"


def _short(name: str, width: int = 24) -> str:
    """A node name fit for a column: Ray node ids (56 hex digits) keep their first 12."""
    return name if len(name) <= width else name[:12] + "..."


def _columns(header: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> list[str]:
    """Aligned text columns; the columns in ``right`` are right-aligned."""
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        out = (
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )
        return ("  " + "  ".join(out)).rstrip()

    return [line(header), *(line(r) for r in rows)]


def _expert_row(row: dict[str, Any]) -> list[str]:
    tokens: dict[str, float] = {}
    snaps = []
    for link in row["links"]:
        if link["kind"] == "tokens":
            tokens[link["tier"]] = tokens.get(link["tier"], 0.0) + link["bytes"]
        else:
            snaps.append(f"{link['tier']} {_bytes(link['bytes'])} to {_short(link['peer_node'])}")
    return [
        f"L{row['layer']}/E{row['expert']}",
        str(row["unit"]),
        row["kind"],
        _short(row["node"]),
        f"{row['load']:.1%}",
        ", ".join(f"{tier} {_bytes(b)}" for tier, b in tokens.items()),
        "; ".join(snaps) or "-",
    ]


def _count(n: int, word: str) -> str:
    return f"{n:,} {word}" + ("" if n == 1 else "s")


def _header_lines(doc: dict[str, Any]) -> list[str]:
    t, w = doc["topology"], doc["workload"]
    kinds = ", ".join(f"{k} {v['units']:,}" for k, v in t["kinds"].items() if v["units"])
    dense = "; ".join(f"unit {d['unit']} ({d['kind']}, node {_short(d['node'])})" for d in doc["dense"])
    replicas = w["replicas"]
    snapshots = (
        f"{_count(replicas, 'snapshot replica')} per expert ({_bytes(w['snapshot_bytes'])} each)"
        if replicas
        else "no snapshot replicas"
    )
    return [
        f"zetta-ray plan: {t['name']}, {t['units']:,} units ({kinds}) on {_count(t['nodes'], 'node')}, "
        f"{_count(t['racks'], 'rack')}, {_count(t['pods'], 'pod')}; {_count(t['pools'], 'memory pool')}",
        f"  workload  {_count(w['n_layers'], 'MoE layer')} x {w['n_experts']} experts, top-{w['top_k']}, "
        f"d_model {w['d_model']}, d_ff {w['d_ff']}; {w['tokens_per_step']:,} tokens/step, load "
        f"{w['load']}; {_count(w['n_dense'], 'dense unit')}; {snapshots}",
        f"  dense     {dense}",
        f"  method    {doc['method']} (seed {doc['seed']})",
    ]


def _tier_lines(doc: dict[str, Any]) -> list[str]:
    rr = doc["round_robin"].get("cost", {}).get("bytes_by_tier", {})
    rows = [
        [
            r["tier"],
            "-" if r["bandwidth_bytes_per_s"] is None else _bytes(r["bandwidth_bytes_per_s"]) + "/s",
            _secs(r["latency_s"]) if r["latency_s"] else "-",
            f"{r['edges']:,}",
            _bytes(r["token_bytes"]),
            _bytes(r["snapshot_bytes"]),
            _bytes(r["token_bytes"] + r["snapshot_bytes"]),
            _bytes(rr.get(r["tier"], 0.0)) if rr else "-",
        ]
        for r in doc["link_tiers"]
    ]
    header = ["tier", "bandwidth", "latency", "edges", "token rows", "snapshots", "total", "round-robin"]
    return ["  bytes per step by link tier:", *_columns(header, rows, right={1, 2, 3, 4, 5, 6, 7})]


def _step_lines(doc: dict[str, Any]) -> list[str]:
    c, rr = doc["cost"], doc["round_robin"]
    lines = [
        f"  predicted step {_secs(c['step_time_s'])}: dense compute {_secs(c['dense_compute_s'])}, "
        f"MoE layers {_secs(sum(c['layer_time_s']))}, snapshots {_secs(c['snapshot_s'])}"
    ]
    if "error" in rr:
        lines.append(f"  round-robin    cannot place this workload: {rr['error']}")
    else:
        lines.append(
            f"  round-robin    {_secs(rr['step_time_s'])} predicted "
            f"(this plan is {doc['speedup_vs_round_robin']:.2f}x as fast)"
        )
    return lines


def format_plan(doc: dict[str, Any], *, limit: int = 64) -> str:
    """The text ``zetta-ray plan`` prints for a ``plan_document``: a header, the first ``limit`` experts
    (all when ``limit`` is 0), bytes per link tier against round-robin, and the predicted step time."""
    experts = doc["experts"]
    shown = experts if limit <= 0 else experts[:limit]
    header = ["expert", "unit", "kind", "node", "load", "token rows/step", "snapshots/step"]
    lines = [*_header_lines(doc), ""]
    lines += _columns(header, [_expert_row(r) for r in shown], right={1, 4})
    if len(shown) < len(experts):
        lines.append(
            f"  ... {len(shown):,} of {len(experts):,} experts shown; --limit 0 shows all, --json PATH "
            "writes all"
        )
    return "\n".join([*lines, "", *_tier_lines(doc), "", *_step_lines(doc)])


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
