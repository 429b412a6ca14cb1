"""A unit's gradient record to a MemoryPool on its node: through Ray's object store, or a shared-memory slot.

Four actors stand in for compute units, each holding ``--mb`` MB of float32 "gradients" (33 MB is a
unit's record in recovery.py's d_model=512 model); one MemoryPool holds what they send. A round is what
the fault manager does after a step: each unit makes its record and the pool puts it (``put.remote(u,
step, unit.<record>.remote(...))``), the newest ``--keep`` records per unit kept. Two transports:

- ``object_store``: the unit returns the record (numpy arrays); Ray writes it into the object store and
  the pool maps it (zetta_ray's path before 57f3565, and still its path to pools on other nodes);
- ``slots``: the unit copies it into one of ``--keep + 2`` shared-memory slots (``actors.staging``),
  reused round-robin as the pool drops old records, and only a description goes through Ray.

Per round, after ``--warmup`` rounds: wall time, and the CPU of the units, the pool, the raylet (it hosts
the object store) and this driver, from each thread's run time in /proc (Linux only). Also the latency of
a call queued right behind the four records (what the next step's forward waits for). Both transports run
in one process, alternating blocks, on the same actors.

    python benchmarks/snapshot_transport.py [--mb 33] [--rounds 40] [--warmup 20] [--blocks 4]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import time

import numpy as np
import ray

from zetta_ray.actors.memory_pool import MemoryPool
from zetta_ray.actors.staging import SlotWriter, slot_name, unlink_slots
from zetta_ray.checkpoint import Snapshot

UNITS = 4


class _Unit:
    def __init__(self, mb: int):
        n = mb * 2**20 // 4 // 4
        rng = np.random.default_rng(0)
        self.grads = {f"g{i}": rng.random(n, dtype=np.float32) for i in range(4)}
        self.slots = SlotWriter()

    def pid(self) -> int:
        return os.getpid()

    def record(self, step: int) -> Snapshot:
        return Snapshot(step=step, tensors=self.grads, extra={"kind": "gradients"})

    def staged(self, step: int, slot: str):
        return self.slots.stage(self.record(step), slot)

    def ping(self) -> int:
        return 0


def _cpu_s(pid: int) -> float:
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        except OSError:
            pass  # the thread ended
    return total / 1e9


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    return int(stat[stat.rfind(")") + 2 :].split()[1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mb", type=int, default=33, help="MB per unit's record")
    parser.add_argument("--rounds", type=int, default=40, help="measured rounds per block")
    parser.add_argument("--warmup", type=int, default=20, help="unmeasured rounds at each block's start")
    parser.add_argument("--blocks", type=int, default=4, help="blocks per transport, alternating")
    parser.add_argument("--keep", type=int, default=8, help="records per unit the pool keeps")
    args = parser.parse_args()
    ray.init(include_dashboard=False, num_cpus=2)
    prefix = f"zetta_ray-{os.getpid()}-{secrets.token_hex(4)}"
    units = [ray.remote(num_cpus=0)(_Unit).remote(args.mb) for _ in range(UNITS)]
    pool = ray.remote(num_cpus=0)(MemoryPool).remote(8 << 30, "pool")
    pids = ray.get([u.pid.remote() for u in units])
    procs = {
        "units": pids,
        "pool": [ray.get(pool.stats.remote())["pid"]],
        "raylet": [_parent(pids[0])],
        "driver": [os.getpid()],
    }
    step = {"n": 0}

    def round_(transport: str) -> list:
        s = step["n"] = step["n"] + 1
        refs = []
        for u, unit in enumerate(units):
            if transport == "slots":
                blob = unit.staged.remote(s, slot_name(prefix, u, 0, "record", s % (args.keep + 2)))
            else:
                blob = unit.record.remote(s)
            refs.append(pool.put.remote(u, s, blob))
        drops = [pool.drop_before.remote(u, s - args.keep + 1) for u in range(UNITS)]
        return refs + drops

    results: dict[str, dict[str, list[float]]] = {}
    try:
        for block in range(args.blocks):
            for transport in ("object_store", "slots") if block % 2 == 0 else ("slots", "object_store"):
                for _ in range(args.warmup):
                    ray.get(round_(transport), timeout=60)
                cpu0 = {k: sum(_cpu_s(p) for p in v) for k, v in procs.items()}
                t0 = time.perf_counter()
                for _ in range(args.rounds):
                    ray.get(round_(transport), timeout=60)
                wall = (time.perf_counter() - t0) / args.rounds
                cpu1 = {k: sum(_cpu_s(p) for p in v) for k, v in procs.items()}
                latency = []
                for _ in range(args.rounds // 2):
                    t = time.perf_counter()
                    acks = round_(transport)  # the records, then a call behind each unit's record
                    ray.get([u.ping.remote() for u in units], timeout=60)
                    latency.append(time.perf_counter() - t)
                    ray.get(acks, timeout=60)
                r = results.setdefault(transport, {})
                r.setdefault("wall_ms", []).append(wall * 1e3)
                r.setdefault("call_behind_records_ms", []).append(statistics.median(latency) * 1e3)
                for k in procs:
                    r.setdefault(f"cpu_ms_{k}", []).append((cpu1[k] - cpu0[k]) / args.rounds * 1e3)
    finally:
        for handle in [*units, pool]:
            ray.kill(handle)
        unlink_slots(prefix + "-")
    out = {"benchmark": "snapshot_transport", "units": UNITS, "mb_per_record": args.mb, "blocks": args.blocks}
    for transport, r in results.items():
        med = {k: round(statistics.median(v), 2) for k, v in r.items()}
        med["cpu_ms_all"] = round(sum(v for k, v in med.items() if k.startswith("cpu_ms_")), 2)
        out[transport] = med
    out["wall_ratio_slots_over_object_store"] = round(
        out["slots"]["wall_ms"] / out["object_store"]["wall_ms"], 3
    )
    out["cpu_ratio_slots_over_object_store"] = round(
        out["slots"]["cpu_ms_all"] / out["object_store"]["cpu_ms_all"], 3
    )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
