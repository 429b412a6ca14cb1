"""PipelineStage: a compute unit that holds a contiguous run of a dense model's layers (issue 18's unit
role ``"stage"``) and runs its part of every micro-batch, forward and backward, on a fixed schedule.

A step is one ``run`` call on every stage. Stage ``s`` walks its schedule (``schedule``: 1F1B or GPipe,
the same lists every step): a forward of micro-batch ``m`` takes its input (the batch's micro-batch from
the controller on the first stage, the previous stage's output otherwise), runs the stage's layers and
sends the output straight to the next stage; the last stage's last layer also takes the targets and
returns the loss. A backward of ``m`` takes the gradient of the stage's output (on the last stage: of
``loss_m / M``, so the step's loss is the mean over micro-batches) and sends the gradient of its input
to the previous stage. Activations and gradients go stage to stage (``send``), never through the
controller, which gets back the micro-batch losses.

Parameter gradients of a run are summed in a buffer of their own, in micro-batch order, and reach
``.grad`` only when the controller commits the run (``loss.backward()``): a forward whose loss nobody
differentiates leaves the gradients alone. ``step`` applies the stage's optimizer. With data
parallelism (``replicas`` pipelines), ``step`` first reduces: the stage's gradient buckets go to the
same stage of every other replica, and the mean of all copies, summed in replica order, replaces
``.grad``, so the replicas stay bitwise equal.

``snapshot`` / ``restore`` are the stage's trickle checkpoint (its layers, optimizer state, steps
applied); ``abort`` makes a run waiting for a failed peer stop at once (``RunAborted``) so that the
stage can be restored and the run replayed (``control/stage_repair.py``).

``PipelineStage`` is plain PyTorch with the transport injected, so a test drives stages in one process
(threads); ``PipelineStageActor`` is the Ray actor, whose ``deliver`` runs in a concurrency group of its
own. Touches Ray: the actor wrapper only (``ray.remote``, ``ray.put`` of each activation and gradient).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import ray
import torch
from torch import nn

from zetta_ray.actors.buckets import GradBuckets, reduce_into
from zetta_ray.actors.dense_replica import split_outputs
from zetta_ray.actors.wire import tree_from_wire, tree_to_wire
from zetta_ray.checkpoint import Snapshot
from zetta_ray.errors import DeadlineExceeded, RecoveryFailed, RunAborted
from zetta_ray.runtime.expert_client import attach_experts

__all__ = ["PipelineStage", "PipelineStageActor", "schedule"]

Op = tuple[str, int]  # ("F" | "B", micro-batch)
Deliver = Callable[[str, int, int, int, np.ndarray], None]  # (kind, to stage, run, micro-batch, array)
Share = Callable[[int, int, np.ndarray], None]  # (step, slot, gradient bucket) to the other replicas


def schedule(kind: str, stages: int, stage: int, microbatches: int) -> list[Op]:
    """The order stage ``stage`` of ``stages`` runs ``microbatches`` micro-batches in. ``"gpipe"``: every
    forward, then every backward. ``"1f1b"``: ``stages - stage - 1`` forwards to fill the pipe, then one
    forward and one backward in turn, then the backwards left (at most ``stages - stage`` activations
    held, instead of ``microbatches``). Backwards run in micro-batch order on both."""
    ops: list[Op] = []
    if kind == "gpipe":
        return [("F", m) for m in range(microbatches)] + [("B", m) for m in range(microbatches)]
    f = b = 0
    for _ in range(min(stages - stage - 1, microbatches)):
        ops.append(("F", f))
        f += 1
    while f < microbatches:
        ops += [("F", f), ("B", b)]
        f, b = f + 1, b + 1
    ops += [("B", m) for m in range(b, microbatches)]
    return ops


class PipelineStage:
    """Stage ``stage`` of ``stages``: the layers ``layers`` (contiguous, in order). See the docstring."""

    def __init__(
        self,
        stage: int,
        stages: int,
        layers: Sequence[nn.Module],
        *,
        seed: int = 0,
        threads: int = 1,
        send: Deliver | None = None,
        deadline_s: float = 60.0,
        replica: int = 0,
        replicas: int = 1,
        share: Share | None = None,
        bucket_bytes: int = 25 * 2**20,
        experts: dict[str, Any] | None = None,
        incarnation: int = 0,
    ):
        torch.set_num_threads(threads)
        self.stage, self.stages = stage, stages
        self.replica, self.replicas = replica, replicas
        self.unit = replica * stages + stage  # its index among the mesh's units
        self.share = share
        self.layers = nn.ModuleList(layers)
        # MoE layers in the stage call the shared expert units (runtime/expert_client.py)
        client = attach_experts(self.layers, source=(self.unit, incarnation), **experts) if experts else None
        self.experts = client
        self.epoch = 0  # zero_grad() calls applied
        self.params = [p for p in self.layers.parameters() if p.requires_grad]
        self.buckets = GradBuckets(self.params, bucket_bytes=bucket_bytes) if self.params else None
        self.seed = seed
        self.send = send
        self.deadline_s = deadline_s
        self.optimizer: torch.optim.Optimizer | None = None
        self.steps_applied = 0
        self._inbox: dict[tuple[str, int, int], np.ndarray] = {}  # (kind, run, micro-batch)
        self._arrived = threading.Condition()
        self._runs: dict[int, list[torch.Tensor | None]] = {}  # run -> its parameter gradients
        self._outputs: dict[int, list[torch.Tensor]] = {}  # the last run's other outputs, by micro-batch
        self.timings: dict[str, float] = {}
        self._structure: dict[str, int] = {}
        self._aborted = False  # a peer failed: runs stop until the next restore

    @property
    def last(self) -> bool:
        return self.stage == self.stages - 1

    # -- a step ---------------------------------------------------------------------------------------

    def run(self, run: int, ops: Sequence[Op], microbatches: int, backward: bool = True) -> dict[str, Any]:
        """Run ``ops`` (forward only, when ``backward`` is False) for run ``run``. The last stage returns
        the micro-batch losses and where the loss sits among its last layer's outputs; others ``{}``."""
        start, busy = time.perf_counter(), 0.0
        held: dict[int, tuple[torch.Tensor | None, Any]] = {}  # micro-batch -> (input, output or loss)
        losses: dict[int, float] = {}
        grads: list[torch.Tensor | None] = [None] * len(self.params)
        self._outputs = {}
        for kind, m in ops:
            if kind == "B" and not backward:
                continue
            needed = self._take("act" if kind == "F" else "grad", run, m) if self._needs(kind) else None
            t0 = time.perf_counter()
            if kind == "F":
                held[m] = self._forward(run, m, needed, microbatches, losses, backward)
            else:
                self._backward(run, m, held.pop(m), needed, microbatches, grads)
            busy += time.perf_counter() - t0
        if backward:
            self._runs[run] = grads
        self.timings = {"run_s": time.perf_counter() - start, "busy_s": busy}
        if not self.last:
            return {}
        return {"losses": [losses[m] for m in sorted(losses)], **self._structure}

    def _needs(self, kind: str) -> bool:
        """Whether an op waits for an array from a peer (the first stage's inputs come with ``feed``)."""
        return kind == "B" and not self.last or kind == "F"

    def _forward(
        self, run: int, m: int, x: np.ndarray, microbatches: int, losses: dict[int, float], backward: bool
    ) -> tuple[torch.Tensor | None, Any]:
        torch.manual_seed(
            hash((self.seed, self.replica, self.stage, run, m)) & (2**63 - 1)
        )  # dropout: replayable
        h = torch.from_numpy(x if x.flags.writeable else x.copy())
        inp = h.requires_grad_() if backward and self.stage > 0 and h.is_floating_point() else h
        with torch.set_grad_enabled(backward):
            out = inp
            for layer in self.layers[:-1] if self.last else self.layers:
                out = layer(out)
            if self.last:
                y = self._take("target", run, m)
                loss_index, outputs = split_outputs(self.layers[-1](out, _tensor(y)))
                self._structure = {"loss_index": loss_index, "n_outputs": len(outputs)}
                loss = outputs[loss_index]
                losses[m] = float(loss.detach())
                self._outputs[m] = [o.detach() for i, o in enumerate(outputs) if i != loss_index]
                return inp, loss / microbatches
        self._send("act", self.stage + 1, run, m, out.detach().numpy())
        return inp, out

    def _backward(
        self,
        run: int,
        m: int,
        held: tuple[torch.Tensor | None, Any],
        grad_out: np.ndarray | None,
        microbatches: int,
        grads: list[torch.Tensor | None],
    ) -> None:
        inp, out = held
        wants_input = self.stage > 0 and inp is not None and inp.requires_grad
        inputs = [*self.params, inp] if wants_input else list(self.params)
        g_out = None if grad_out is None else torch.from_numpy(np.array(grad_out))
        got = torch.autograd.grad(out, inputs, grad_outputs=g_out, allow_unused=True)
        for i, g in enumerate(got[: len(self.params)]):  # summed in micro-batch order: deterministic
            if g is not None:
                grads[i] = g.clone() if grads[i] is None else grads[i].add_(g)
        if wants_input:
            g_in = got[-1] if got[-1] is not None else torch.zeros_like(inp)
            self._send("grad", self.stage - 1, run, m, g_in.numpy())

    def _send(self, kind: str, to: int, run: int, m: int, array: np.ndarray) -> None:
        if self.send is not None:
            self.send(kind, to, run, m, array)

    # -- arrays from peers and the controller ---------------------------------------------------------

    def deliver(self, kind: str, run: int, m: int, array: np.ndarray) -> None:
        """Take an activation (``"act"``), an output gradient (``"grad"``) or targets (``"target"``) of
        micro-batch ``m`` of run ``run``."""
        with self._arrived:
            self._inbox[(kind, run, m)] = array
            self._arrived.notify_all()

    def _take(self, kind: str, run: int, m: int, what: str | None = None) -> np.ndarray:
        """The array ``(kind, run, m)`` once delivered; ``what`` names it in a deadline error."""
        end = time.monotonic() + self.deadline_s
        with self._arrived:
            while (kind, run, m) not in self._inbox:
                if self._aborted:
                    raise RunAborted(
                        f"stage {self.stage}: run {run} stopped waiting for the {kind} of micro-batch {m}: "
                        "a peer stage failed; the run is replayed once the peer is rebuilt"
                    )
                left = end - time.monotonic()
                if left <= 0:
                    source = self.stage - 1 if kind == "act" else self.stage + 1
                    raise DeadlineExceeded(
                        unit=self.unit,
                        experts=[],
                        step=self.steps_applied,
                        phase=what or f"pipeline {kind} of micro-batch {m} (from stage {source})",
                        deadline_s=self.deadline_s,
                    )
                self._arrived.wait(left)
            return self._inbox.pop((kind, run, m))

    def abort(self) -> None:
        """A peer failed: the run in progress (and any queued before the next ``restore``) stops at its
        next wait for a peer instead of at the deadline."""
        with self._arrived:
            self._aborted = True
            self._arrived.notify_all()

    # -- snapshots ------------------------------------------------------------------------------------

    def snapshot(self, step: int) -> Snapshot:
        """The stage's state after ``step`` optimizer steps: layers, optimizer state, steps applied.
        Taken between an optimizer step and the next ``zero_grad``; gradients, activations and the
        inbox belong to a step that a restore replays."""
        optimizer = self.optimizer
        return Snapshot(
            step=step,
            tensors=self.state_dict(),
            optimizer=self.optimizer_state(),
            mesh={"stage": self.stage, "stages": self.stages},
            extra={
                "steps_applied": self.steps_applied,
                "epoch": self.epoch,
                "training": self.layers.training,
                "optimizer_class": type(optimizer).__name__ if optimizer is not None else None,
            },
        )

    def restore(self, snapshot: Snapshot) -> int:
        """Go back to ``snapshot`` (this stage's, from a pool): its layers and optimizer state (an
        optimizer must be set first when it has some), no gradients, no pending runs, an empty inbox;
        the run stops being aborted. Returns the snapshot's step. Every delivery a replayed run needs is
        sent again; one from before the restore that arrives late carries what the replay sends
        (same state, same inputs, same dropout seed), so it does no harm."""
        if snapshot.mesh.get("stage") != self.stage:
            raise ValueError(
                f"stage {self.stage} cannot restore the snapshot of stage {snapshot.mesh.get('stage')}"
            )
        saved = snapshot.extra.get("optimizer_class")
        if saved is not None and type(self.optimizer).__name__ != saved:
            raise ValueError(
                f"stage {self.stage} has optimizer {type(self.optimizer).__name__}, its snapshot of step "
                f"{snapshot.step} holds {saved} state; call set_optimizer({saved}, ...) before restoring"
            )
        self.load_state_dict(snapshot.tensors)
        if snapshot.optimizer:
            self.optimizer.load_state_dict(tree_from_wire(snapshot.optimizer))
        elif saved is None:
            self.optimizer = None
        self.steps_applied = int(snapshot.extra["steps_applied"])
        self.epoch = int(snapshot.extra["epoch"])
        if self.experts is not None:
            self.experts.sync(self.steps_applied, self.epoch)
        self.layers.train(bool(snapshot.extra["training"]))
        self.zero_grad()
        with self._arrived:
            self._inbox.clear()
            self._runs.clear()
            self._outputs = {}
            self._aborted = False
        return snapshot.step

    # -- gradients, optimizer, state ----------------------------------------------------------------

    def commit(self, run: int) -> None:
        """Add run ``run``'s parameter gradients to ``.grad`` (its loss was differentiated)."""
        for p, g in zip(self.params, self._runs.pop(run), strict=True):
            if g is not None:
                p.grad = g if p.grad is None else p.grad.add_(g)

    def discard(self, before: int) -> None:
        """Forget the gradients of runs before ``before`` that were never committed."""
        for run in [r for r in self._runs if r < before]:
            del self._runs[run]

    def output(self, index: int) -> np.ndarray:
        """Output ``index`` (among the non-loss outputs) of the last run, micro-batches concatenated."""
        return torch.cat([self._outputs[m][index] for m in sorted(self._outputs)]).numpy()

    def step(self) -> None:
        if self.optimizer is None:
            raise RuntimeError(f"stage {self.stage}: step() before set_optimizer()")
        if self.replicas > 1:
            self._reduce()
        self.optimizer.step()
        self.steps_applied += 1
        if self.experts is not None:
            self.experts.count_step()  # the controller steps the expert units

    def _reduce(self) -> None:
        """Data parallelism: the mean of every replica's gradients of this stage, summed in replica
        order (``reduce_into``), written into ``.grad``. This stage's buckets go to the same stage of
        the other replicas (``share``); theirs arrive in the inbox as ``("bucket", step, slot)``."""
        step, n = self.steps_applied, len(self.buckets.buckets)
        own = [self.buckets.flatten(b) for b in range(n)]
        if self.share is not None:
            for b, flat in enumerate(own):
                self.share(step, self.replica * n + b, flat)
        copies = {}
        for r in range(self.replicas):
            for b in range(n):
                what = f"gradient reduction of step {step + 1} (bucket {b} from replica {r})"
                copies[(r, b)] = own[b] if r == self.replica else self._take("bucket", step, r * n + b, what)
        reduce_into(self.buckets, copies, self.replicas)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def new_epoch(self) -> None:
        """The loop's ``opt.zero_grad()``: no gradients, and the expert units are told at the next call."""
        self.zero_grad()
        self.epoch += 1
        if self.experts is not None:
            self.experts.zero_grad()

    def set_optimizer(self, optimizer_cls: type[torch.optim.Optimizer], kwargs: dict[str, Any]) -> None:
        self.optimizer = optimizer_cls(self.params, **kwargs)

    def train(self, mode: bool) -> None:
        self.layers.train(mode)

    def optimizer_state(self) -> dict[str, Any]:
        return tree_to_wire(self.optimizer.state_dict()) if self.optimizer is not None else {}

    def state_dict(self) -> dict[str, np.ndarray]:
        """The stage's layers' state, keyed ``"{layer index in the stage}.{name}"``."""
        return {k: v.detach().numpy().copy() for k, v in self.layers.state_dict().items()}

    def load_state_dict(self, tensors: dict[str, np.ndarray]) -> None:
        self.layers.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in tensors.items()})

    def ping(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "data_rank": self.replica,
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id() if ray.is_initialized() else None,
            "steps_applied": self.steps_applied,
            "timings": dict(self.timings),
        }


def _tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a if a.flags.writeable else a.copy())


class _StageProcess(PipelineStage):
    """The actor's body: a PipelineStage whose activations and gradients go to its neighbours."""

    def __init__(self, stage: int, stages: int, layers: Sequence[nn.Module], **options: Any):
        super().__init__(stage, stages, layers, send=self._to_peer, share=self._to_replicas, **options)
        self.peers: list[Any] = []
        self.column: list[Any] = []

    @ray.method(concurrency_group="peers")
    def connect(self, mesh: list[list[Any]]) -> None:
        """The mesh's stage actors, ``mesh[replica][stage]``: this stage's pipeline neighbours are in
        its own row, the stages it reduces gradients with in its column."""
        self.peers = list(mesh[self.replica])
        self.column = [row[self.stage] for row in mesh]

    def _to_replicas(self, step: int, slot: int, flat: np.ndarray) -> None:
        ref = ray.put(flat)  # once, whatever the number of replicas
        for r, peer in enumerate(self.column):
            if r != self.replica:
                peer.deliver.remote("bucket", step, slot, ref)

    @ray.method(concurrency_group="peers")
    def abort(self) -> None:
        super().abort()

    def keep_snapshot(self, step: int, pools: list[Any]) -> list[Any]:
        """Hand the snapshot of ``step`` to every pool in ``pools``; returns their acknowledgements
        (ObjectRefs, in a list so that Ray does not wait for them here); none from replicas but 0."""
        if self.replica > 0:
            return []  # every replica's stage holds the same state: one copy, from replica 0
        snap = self.snapshot(step)
        return [pool.put.remote(f"stage-{self.stage}", step, snap) for pool in pools]

    def restore_from(self, step: int, pools: list[Any]) -> int:
        """Restore this stage's snapshot of ``step`` from the first pool in ``pools`` that holds it."""
        errors = []
        for pool in pools:
            try:
                snap = ray.get(pool.get.remote(f"stage-{self.stage}", step), timeout=self.deadline_s)
            except (ray.exceptions.RayError, LookupError) as e:
                errors.append(f"{type(e).__name__}: {e}")
                continue
            return self.restore(snap)
        raise RecoveryFailed(
            f"stage {self.stage}: no pool of {len(pools)} could give its snapshot of step {step}: {errors}"
        )

    def _to_peer(self, kind: str, to: int, run: int, m: int, array: np.ndarray) -> None:
        self.peers[to].deliver.remote(kind, run, m, ray.put(array))

    @ray.method(concurrency_group="peers")
    def deliver(self, kind: str, run: int, m: int, array: np.ndarray) -> None:
        super().deliver(kind, run, m, array)


PipelineStageActor = ray.remote(max_restarts=0, max_task_retries=0, concurrency_groups={"peers": 1})(
    _StageProcess
)
