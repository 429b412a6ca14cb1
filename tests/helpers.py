"""What several test modules share: the tiny models and run configs, the CLI command, one torch thread,
and the unit-actor drill of the pool tests. Importable as ``helpers`` (pyproject's ``pythonpath``); no
test module imports another. The cluster fixtures are in tests/conftest.py.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

import zetta_ray as zr
from zetta_ray.actors import ComputeUnitActor
from zetta_ray.actors.wire import to_wire
from zetta_ray.experts import ExpertFFN

T = 30  # seconds: the deadline of a remote call in the pool tests


class Residual(torch.nn.Module):
    """``h + mlp(h)``, a pre-norm MLP block."""

    def __init__(self, d: int, dropout: float):
        super().__init__()
        self.mlp = torch.nn.Sequential(
            torch.nn.LayerNorm(d),
            torch.nn.Linear(d, 4 * d),
            torch.nn.GELU(),
            torch.nn.Dropout(dropout),
            torch.nn.Linear(4 * d, d),
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.mlp(h)


class LossHead(torch.nn.Module):
    """The last layer: norm, vocabulary projection, cross-entropy; ``(logits, loss)``."""

    def __init__(self, d: int, vocab: int):
        super().__init__()
        self.norm = torch.nn.LayerNorm(d)
        self.proj = torch.nn.Linear(d, vocab)

    def forward(self, h: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.proj(self.norm(h))
        return logits, torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())


class DenseLM(torch.nn.Module):
    """A tiny dense language model (no MoE layer) for the data- and pipeline-parallel tests: ``logits,
    loss = model(x, y)`` with ``x``, ``y`` token ids of shape [batch, seq]; ``pipeline_layers()`` is the
    pipeline protocol. Ray pickles it by value for the units
    (``ray.cloudpickle.register_pickle_by_value(helpers)``), as it does a class of a script."""

    def __init__(self, vocab: int = 64, d: int = 32, seed: int = 0, dropout: float = 0.0, blocks: int = 2):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(vocab, d)
        self.blocks = torch.nn.ModuleList(Residual(d, dropout) for _ in range(blocks))
        self.head = LossHead(d, vocab)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h, y)

    def pipeline_layers(self) -> list[torch.nn.Module]:
        return [self.embed, *self.blocks, self.head]


class MoEBlock(torch.nn.Module):
    """``h + moe(norm(h))``: a pre-norm block whose feed-forward is a ``zr.MoELayer`` (aux loss unused)."""

    def __init__(self, d: int, experts: int):
        super().__init__()
        self.norm = torch.nn.LayerNorm(d)
        self.moe = zr.MoELayer(d, 2 * d, experts, top_k=2)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        y, _ = self.moe(self.norm(h))
        return h + y


class MoEPipeLM(DenseLM):
    """``DenseLM`` with MoE blocks: the model that data, pipeline and expert parallelism compose on."""

    def __init__(self, vocab: int = 64, d: int = 32, seed: int = 0, experts: int = 4, blocks: int = 2):
        super().__init__(vocab, d, seed, blocks=0)
        self.blocks = torch.nn.ModuleList(MoEBlock(d, experts) for _ in range(blocks))


def dense_batches(n: int, batch: int = 8, seq: int = 16, vocab: int = 64) -> list[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(7)
    return [
        (
            torch.randint(0, vocab, (batch, seq), generator=g),
            torch.randint(0, vocab, (batch, seq), generator=g),
        )
        for _ in range(n)
    ]


def train_steps(
    dmodel: Any, batches: list[tuple[torch.Tensor, ...]], lr: float = 1e-2, monkey: Any = None
) -> list[float]:
    """The usual loop on a module on units (AdamW): returns each step's ``loss.item()``. A ``monkey``
    (``zr.chaos.Chaos``) is called at each step's forward, backward and optimizer phase."""
    opt = dmodel.optimizer(torch.optim.AdamW, lr=lr)
    losses = []
    for step, (x, y) in enumerate(batches):
        opt.zero_grad()
        if monkey is not None:
            monkey(dmodel, step, "forward")
        _, loss = dmodel(x, y)
        if monkey is not None:
            monkey(dmodel, step, "backward")
        loss.backward()
        opt.step()
        if monkey is not None:
            monkey(dmodel, step, "optimizer")
        losses.append(loss.item())
    return losses


def accumulate_reference(
    model: torch.nn.Module, batches: list[tuple[torch.Tensor, ...]], world: int, lr: float = 1e-2
) -> tuple[list[float], dict[str, torch.Tensor]]:
    """One process doing what ``world`` data-parallel replicas (or ``world`` pipeline micro-batches)
    promise: per step, ``(loss_i / world).backward()`` over the batch's ``world`` parts, then one AdamW
    step. Returns the step losses (the mean of the parts' losses) and the final state."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for x, y in batches:
        opt.zero_grad()
        shard_losses = []
        for xs, ys in zip(x.chunk(world), y.chunk(world), strict=True):
            _, loss = model(xs, ys)
            (loss / world).backward()
            shard_losses.append(loss.item())
        opt.step()
        losses.append(float(np.mean(shard_losses)))
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


#: A ``zetta-ray train`` run small enough for a test: two layers of four experts over two units, run for
#: ``TINY_RUN_STEPS`` steps by the tests that kill its controller or submit it as a job.
TINY_RUN_STEPS = 10
TINY_RUN_TOML = """
[model]
d_model = 32
n_layers = 2
n_heads = 2
n_experts = 4
d_ff = 64
seq_len = 32

[train]
batch_size = 4
lr = 1e-2
expert_degree = 2
corpus_bytes = 200_000
"""


def tiny_config(**overrides: Any) -> zr.MoEConfig:
    """The tiny ``MoETransformer`` the fault and slice tests train: two layers, eight experts, d_model 32."""
    values = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_experts=8, top_k=2, d_ff=64, seq_len=16)
    return zr.MoEConfig(**{**values, **overrides})


def two_node_spec(**extra: object) -> dict[str, object]:
    """The hand-checked machine of the placement tests: node 0 has unit 0 (gpu, 1 MFLOP/s) and unit 1
    (npu, 2 MFLOP/s), node 1 has unit 2 (npu, 1 MFLOP/s); a 1 TB pool on each; one rack. ``extra`` adds
    keys of ``Topology.from_spec`` (``links``)."""
    unit = {"memory": 1e9}
    pool = {"memory": 1e12, "bandwidth": 1e9}
    nodes = [
        {
            "units": [{"kind": "gpu", "flops": 1e6, **unit}, {"kind": "npu", "flops": 2e6, **unit}],
            "pools": [pool],
        },
        {"units": [{"kind": "npu", "flops": 1e6, **unit}], "pools": [pool]},
    ]
    return {**extra, "nodes": nodes}


def zetta_ray_command(*args: str) -> list[str]:
    """The ``zetta-ray`` command of this environment (its script, else ``python -m zetta_ray.cli``)."""
    script = shutil.which("zetta-ray", path=str(Path(sys.executable).parent))
    return [*([script] if script else [sys.executable, "-m", "zetta_ray.cli"]), *args]


def complete_steps(checkpoints: Path) -> list[int]:
    """The steps of the durable checkpoints under ``checkpoints`` that are complete."""
    return sorted(int(d.name.split("-")[1]) for d in checkpoints.glob("step-*") if (d / "COMPLETE").exists())


@contextmanager
def one_thread() -> Iterator[None]:
    """Torch on one thread, as the units run: the same reduction order on both sides of a comparison."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# -- the unit-actor drill of tests/ray/test_memory_pool.py and tests/cluster/test_pool_on_other_node.py --

UNIT_KEYS = [(0, 0), (0, 1), (1, 1)]  # (layer, expert) of the experts one test unit hosts
UNIT_D = 8


def unit_actor(**options: Any) -> Any:
    """A ComputeUnit actor hosting ``UNIT_KEYS`` (quarter of a CPU; ``options`` add Ray actor options)."""
    skeletons = {k: ExpertFFN(UNIT_D, 16).to("meta") for k in UNIT_KEYS}
    return ComputeUnitActor.options(num_cpus=0.25, **options).remote(0, skeletons)


def load_units(units: list[Any]) -> None:
    """The same seeded weights and an AdamW into every unit of ``units``."""
    torch.manual_seed(0)
    weights = {
        f"{l}.{e}.{n}": to_wire(t)
        for l, e in UNIT_KEYS
        for n, t in ExpertFFN(UNIT_D, 16).state_dict().items()
    }
    calls = [u.load_state_dict.remote(weights) for u in units]
    calls += [u.set_optimizer.remote(torch.optim.AdamW, {"lr": 0.02}) for u in units]
    ray.get(calls, timeout=T)


def train_units(units: list[Any], steps: range) -> None:
    """The same calls to every unit of ``units``: one forward and backward per layer, then the step."""
    calls = []
    for step in steps:
        for layer, (experts, counts) in enumerate([([0, 1], [4, 2]), ([1], [6])]):
            g = torch.Generator().manual_seed(10 * step + layer)
            x, dy = torch.randn(6, UNIT_D, generator=g).numpy(), torch.randn(6, UNIT_D, generator=g).numpy()
            for u in units:
                calls.append(u.forward.remote((step, layer, 0), experts, counts, x, True, step + 1))
                calls.append(u.backward.remote((step, layer, 0), dy, step + 1))
        calls += [u.step.remote(step, step + 1) for u in units]
    ray.get(calls, timeout=T)


def assert_same_units(a: Any, b: Any) -> None:
    """Units ``a`` and ``b`` hold bitwise the same parameters and optimizer state."""
    sa, sb = ray.get([a.state_dict.remote(), b.state_dict.remote()], timeout=T)
    assert sa.keys() == sb.keys() and all(np.array_equal(sa[k], sb[k]) for k in sa)
    oa, ob = ray.get([a.optimizer_state_dict.remote(), b.optimizer_state_dict.remote()], timeout=T)
    assert oa["param_groups"] == ob["param_groups"]
    assert all(
        np.array_equal(oa["state"][i][n], ob["state"][i][n]) for i in oa["state"] for n in oa["state"][i]
    )


def wait_until_dead(actor: Any, timeout_s: float = T) -> None:
    """Calls to an actor can still run just after ``ray.kill`` or a node's removal: wait until one fails."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get(actor.ping.remote(), timeout=timeout_s)
        except ray.exceptions.RayActorError:
            return
        time.sleep(0.1)
    raise TimeoutError(f"actor still answers {timeout_s} s after it was killed")
