"""Rows through Ray's object store against rows through zetta_ray's shared memory (actors/shm.py).

Four actors on this node each get calls that carry ``--kib`` KiB of float32 rows and return as many
(the rows times two). Object store: the rows are a numpy argument and the result a numpy return value,
as for units on other nodes. Shared memory: the caller copies the rows into a region of a
``SharedArena`` and sends descriptors; the actor reads its rows in place and writes its result into a
second region, as ``ExpertRuntime`` does for units on the controller's node. Prints one JSON object: the
caller's CPU time and the wall time per call, median of ``--repeats`` batches of ``--calls`` calls after
one warm-up batch, and their ratios (object store / shared memory).

    python benchmarks/transport.py [--kib 1024] [--calls 200] [--repeats 3]
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
from zetta_ray.actors.shm import SharedArena, SharedRows, read_rows, write_rows


@ray.remote(num_cpus=0)
class Echo:
    def by_value(self, x: np.ndarray) -> np.ndarray:
        return x * 2

    def in_place(self, x: SharedRows, out: SharedRows) -> SharedRows:
        write_rows(out, read_rows(x) * 2)
        return out


def _time(submit, calls: int) -> tuple[float, float]:
    """(caller CPU ms per call, wall ms per call) of ``calls`` calls submitted at once, then awaited."""
    cpu, wall = time.process_time(), time.perf_counter()
    ray.get([submit(i) for i in range(calls)], timeout=300)
    return 1e3 * (time.process_time() - cpu) / calls, 1e3 * (time.perf_counter() - wall) / calls


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kib", type=int, default=1024)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    zr.init()
    arena = SharedArena.create()
    if arena is None:
        raise SystemExit("no /dev/shm here: zetta_ray sends every row through the object store")
    actors = [Echo.remote() for _ in range(4)]
    rows = torch.rand(args.kib * 1024 // (4 * 256), 256)
    x = rows.numpy()
    expected = x * 2

    held: list[SharedRows] = []  # a batch's regions live until it was awaited, as a call's args do

    def by_value(i: int):
        return actors[i % 4].by_value.remote(x)

    def in_place(i: int):
        shared_in = arena.share(rows)
        out = arena.empty(tuple(rows.shape), np.float32)
        held.extend((shared_in, out))
        return actors[i % 4].in_place.remote(shared_in, out.take(out.ranges, output=True))

    assert np.array_equal(ray.get(by_value(0)), expected)
    ref = in_place(0)
    assert np.array_equal(read_rows(ray.get(ref)), expected)  # same work on both sides
    results: dict[str, list[tuple[float, float]]] = {"object_store": [], "shared_memory": []}
    for r in range(args.repeats + 1):
        for name, submit in (("object_store", by_value), ("shared_memory", in_place)):
            measured = _time(submit, args.calls)
            held.clear()
            if r:  # the first batch warms both paths up
                results[name].append(measured)
    med = {
        name: (statistics.median(c for c, _ in runs), statistics.median(w for _, w in runs))
        for name, runs in results.items()
    }
    arena.close()
    print(
        json.dumps(
            {
                "benchmark": "transport",
                "payload_bytes": int(x.nbytes),
                "actors": len(actors),
                "calls": args.calls,
                "object_store_cpu_ms": round(med["object_store"][0], 3),
                "object_store_wall_ms": round(med["object_store"][1], 3),
                "shared_memory_cpu_ms": round(med["shared_memory"][0], 3),
                "shared_memory_wall_ms": round(med["shared_memory"][1], 3),
                "cpu_ratio": round(med["object_store"][0] / med["shared_memory"][0], 2),
                "wall_ratio": round(med["object_store"][1] / med["shared_memory"][1], 2),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
