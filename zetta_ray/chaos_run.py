"""What ``zetta-ray chaos`` needs around ``zetta_ray.chaos``: its checks, its cluster and its report.

The command runs the train job twice, without and with injected faults, and compares the final states.
``check_kills`` refuses faults the run cannot take; ``chaos_cluster`` decides where the runs go and what
kills a node; ``chaos_report`` is what ``--json`` writes and ``format_chaos`` what the command prints.

Ray: ``chaos_cluster`` starts a local multi-node ``ray.cluster_utils.Cluster`` (``--nodes``) or joins a
cluster and reads its nodes (``--address`` with node kills); the report functions touch no Ray.
"""

from __future__ import annotations

import math
import os
from contextlib import ExitStack
from typing import Any

import ray

import zetta_ray as zr
from zetta_ray.chaos import Chaos, ClusterNodeKiller, Kill, RayletKiller, local_cluster
from zetta_ray.errors import ConfigError
from zetta_ray.trainer import TrainResult

__all__ = ["chaos_cluster", "chaos_report", "check_kills", "format_chaos"]


def check_kills(kills: list[Kill], rate: float, degree: int, replicas: int = 0) -> None:
    """Refuse a run without faults, and unit or node kills past the run's units: ``replicas`` dense
    replicas (``data_parallel`` > 1) then the ``degree`` expert units."""
    if not kills and not rate:
        raise ConfigError("zetta-ray chaos needs faults: --kill TARGET:STEP[:PHASE[:INDEX]] or --rate R")
    units = replicas + degree
    for k in kills:
        if k.target in ("unit", "node") and k.index >= units:
            where = f"{replicas} dense replicas, then {degree} expert units" if replicas else "expert_degree"
            raise ConfigError(
                f"--kill {k.target}:{k.step}:{k.phase}:{k.index}: the run has {units} compute units "
                f"({where}); use an INDEX in 0..{units - 1}"
            )


def chaos_cluster(
    stack: ExitStack, *, address: str | None, nodes: int | None, wants_nodes: bool, degree: int
) -> tuple[str | None, Any, str]:
    """Where the chaos runs (an address for ``train``), what kills a node, and a label for the report.

    ``nodes`` (``--nodes N``) starts a local multi-node cluster, kept open by ``stack``, and removes its
    nodes; ``address`` (``--address``, or ``RAY_ADDRESS``) joins a cluster and SIGKILLs a node's raylet;
    a node kill (``wants_nodes``) on an embedded single-node cluster is refused."""
    env_address = address or os.environ.get("RAY_ADDRESS")
    if nodes is not None:  # argparse keeps --nodes and --address apart
        if nodes < 1:
            raise ConfigError(f"--nodes {nodes} is invalid: give the number of worker nodes, >= 1")
        per = math.ceil(degree / nodes)  # every unit fits on the workers, none on the head
        cluster = stack.enter_context(local_cluster(nodes, units={"npu": per}, cpus_per_worker=per))
        setting = f"a local cluster: a head node (the driver), {nodes} worker node(s) of {per} npu each"
        return cluster.address, ClusterNodeKiller(cluster), setting
    if not wants_nodes:
        return address, None, f"the cluster at {env_address}" if env_address else "an embedded local cluster"
    if not env_address and not ray.is_initialized():
        raise ConfigError(
            "a node kill needs several nodes, but without --address this runs on an embedded single-node "
            "cluster; add --nodes N to start a local cluster of N worker nodes, or --address ADDR to "
            "join a multi-node cluster"
        )
    zr.init(address)
    where = ray.get_runtime_context().gcs_address
    alive = [n for n in ray.nodes() if n["Alive"]]
    if len(alive) < 2:
        raise ConfigError(
            f"a node kill needs a node other than the driver's, but the cluster at {where} has "
            f"{len(alive)} live node; add nodes, or use --nodes N for a local multi-node cluster"
        )
    return address, RayletKiller(), f"the cluster at {where} ({len(alive)} live nodes)"


def _kill_to_next_step(injected_at: list[float], step_ends: list[float]) -> list[float | None]:
    """For each fault: seconds from its injection to the end of the next completed step."""
    return [next((round(t - at, 3) for t in step_ends if t > at), None) for at in injected_at]


def chaos_report(
    setting: str, monkey: Chaos, clean: TrainResult, faulty: TrainResult, step_ends: list[float]
) -> dict[str, Any]:
    """What ``zetta-ray chaos --json`` writes: the faults, the recoveries, their timing, and the verdict.

    ``step_ends`` holds the ``time.perf_counter()`` at the end of each step of the faulty run."""
    lost = [r["step"] - r["restored_step"] for r in faulty.recoveries]
    times = sorted(r["recovery_s"] for r in faulty.recoveries)
    return {
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


def format_chaos(monkey: Chaos, faulty: TrainResult, report: dict[str, Any]) -> str:
    """The text ``zetta-ray chaos`` prints: one line per fault and per recovery, then the verdict."""
    lines = [f"injected: {f}" for f in monkey.injected]
    lines += [
        f"recovered: unit {r['unit']} ({r['kind']} in {r['phase']} at step {r['step']}) by "
        f"{r['action']} on node {(r['node'] or '?')[:12]} from snapshot {r['restored_step']} "
        f"({r['redone_records']} gradient records redone) in {r['recovery_s']:.2f} s, "
        f"{r['replayed_calls']} calls replayed"
        for r in faulty.recoveries
    ]
    verdict = "IDENTICAL" if report["bitwise_identical"] else "DIFFERS"
    lines.append(
        f"{len(monkey.injected)} fault(s), {len(faulty.recoveries)} recovery(ies), steps redone "
        f"{report['steps_redone']['max']}; final state {verdict} to the fault-free run "
        f"({faulty.state_sha256[:16]})"
    )
    return "\n".join(lines)
