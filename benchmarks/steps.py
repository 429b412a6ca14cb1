"""What the step benchmarks share: this process's CPU seconds, and a timed training loop.

Imported by the scripts next to it (``python benchmarks/<script>.py`` puts this folder on the path).
"""

from __future__ import annotations

import argparse
import resource
import time
from typing import Any

import torch


def cpu_s() -> float:
    """CPU seconds of this process so far, every thread (torch's and Ray's) included."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def time_steps(model: Any, opt: Any, x: Any, y: Any, n: int) -> tuple[list[float], list[float]]:
    """``n`` training steps of ``model``: each one's wall and CPU seconds. A step is done when its loss
    is known (zetta_ray's calls all return at once)."""
    walls, cpus = [], []
    for _ in range(n):
        start, cpu = time.perf_counter(), cpu_s()
        opt.zero_grad()
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        loss.item()
        walls.append(time.perf_counter() - start)
        cpus.append(cpu_s() - cpu)
    return walls, cpus


def rotate(
    sides: dict[str, tuple[Any, Any]],
    x: Any,
    y: Any,
    *,
    rounds: int,
    warmup: int,
    steps: int,
    threads: int,
    after: Any = None,
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """``rounds`` rounds of ``warmup + steps`` steps of every side (``name -> (model, optimizer)``), who
    goes first rotating; the measured steps' wall and CPU seconds by side. ``after(name)`` runs after
    each side's turn (to read the units' timings)."""
    walls: dict[str, list[float]] = {name: [] for name in sides}
    cpus: dict[str, list[float]] = {name: [] for name in sides}
    order = list(sides)
    for r in range(rounds):
        for name in order[r % len(order) :] + order[: r % len(order)]:
            torch.set_num_threads(threads)
            model, opt = sides[name]
            w, c = time_steps(model, opt, x, y, warmup + steps)
            walls[name] += w[warmup:]
            cpus[name] += c[warmup:]
            if after is not None:
                after(name)
    return walls, cpus


def step_parser(doc: str, *, tokens: int, steps: int) -> argparse.ArgumentParser:
    """The step benchmarks' common flags."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=tokens)
    parser.add_argument("--steps", type=int, default=steps, help="measured steps per side per round")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured steps at a round's start")
    parser.add_argument("--rounds", type=int, default=4, help="even: each side leads as often")
    parser.add_argument("--threads", type=int, default=2)
    return parser
