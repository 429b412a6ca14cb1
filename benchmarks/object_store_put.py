"""What one ``ray.put`` of a large array costs the process that makes it: cold pages against warm ones.

A put copies the array into the object store's shared memory. The store hands out space anywhere in
its arena (7.5 GB on this machine), and the first write a process makes to a page of the arena it has
not touched before takes a page fault. So the same put costs several times more while the process
is still meeting new parts of the arena than once it has touched the parts the store reuses. This
script makes ``--puts`` puts of one ``--mb`` MB array from one actor, keeping the last ``--alive``
alive (like a unit's snapshots held by pools), and prints, per block of 20 puts, the median page
faults and CPU milliseconds of a put, next to a warm memcpy of the same bytes.

    python benchmarks/object_store_put.py [--mb 33] [--puts 400] [--alive 8]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import numpy as np
import ray

import zetta_ray as zr

BLOCK = 20


@ray.remote(num_cpus=0)
class Putter:
    def run(self, mb: int, puts: int, alive: int) -> dict:
        a = np.ones(mb * 2**18, np.float32)
        dst = np.empty_like(a)
        dst[:] = a
        start = time.process_time()
        for _ in range(5):
            np.copyto(dst, a)
        memcpy_ms = 1e3 * (time.process_time() - start) / 5
        keep, rows = [], []
        for _ in range(puts):
            faults, cpu = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.process_time()
            keep.append(ray.put(a))
            if len(keep) > alive:
                keep.pop(0)
            rows.append(
                (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults, time.process_time() - cpu)
            )
        blocks = [
            {
                "first_put": i,
                "faults": int(statistics.median(r[0] for r in rows[i : i + BLOCK])),
                "cpu_ms": round(1e3 * statistics.median(r[1] for r in rows[i : i + BLOCK]), 1),
            }
            for i in range(0, puts, BLOCK)
        ]
        return {"memcpy_ms": round(memcpy_ms, 2), "blocks": blocks}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mb", type=int, default=33, help="array size (33 MB: one unit's gradient record)")
    parser.add_argument("--puts", type=int, default=400)
    parser.add_argument("--alive", type=int, default=8, help="how many of the newest puts stay referenced")
    args = parser.parse_args()
    zr.init()
    result = ray.get(Putter.remote().run.remote(args.mb, args.puts, args.alive), timeout=3600)
    print(
        json.dumps(
            {
                "benchmark": "object_store_put",
                "mb": args.mb,
                "alive": args.alive,
                "object_store_gb": round(ray.cluster_resources().get("object_store_memory", 0) / 1e9, 2),
                **result,
            }
        )
    )


if __name__ == "__main__":
    main()
