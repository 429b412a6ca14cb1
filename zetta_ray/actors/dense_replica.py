"""DenseReplica: a compute unit that holds one data-parallel copy of a dense model and trains on one
shard of each batch (issue 18's unit role ``"data"``).

Each replica runs the model's forward and backward on its shard. During backward, ``GradBuckets``
(``buckets.py``) hands every gradient bucket the moment it is complete to ``send``, which gives it to
every replica, this one included; the transfer overlaps the rest of backward. ``step`` waits (within a
deadline) until every replica's copy of every bucket of this step is in, reduces each bucket in replica
order (``BucketReducer``: the mean over replicas, summed 0, 1, ... whatever the arrival order), writes
the means into ``.grad`` and steps the optimizer. Every replica thus applies the same gradients to the
same parameters and stays bitwise equal to its siblings, which is what lets a dead replica be rebuilt
from a live one (``state`` / ``load_state``) instead of from a checkpoint.

Gradient accumulation: ``backward`` may run several times before a step (one per micro-batch); each
pass sends the accumulated gradients tagged with its pass number and ``step(passes)`` reduces the copies
of the last pass only.

``DenseReplica`` is plain PyTorch and numpy with the transport injected (``send``), so a test or a GPU
smoke script drives replicas in one process; ``DenseReplicaActor`` is the Ray actor, whose ``receive``
runs in a concurrency group of its own so that peers' buckets are taken while this replica computes.
With ``experts`` (``zr.ExpertParallel`` too) the replica's MoE layers send their rows straight to the
shared expert units (``runtime/expert_client.py``); the controller steps those units.
Touches Ray: the actor wrapper (``ray.remote``, ``ray.put`` of each bucket once for all peers), and
the expert units' calls through the expert client.
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

from zetta_ray.actors.buckets import BucketInbox, GradBuckets, reduce_into
from zetta_ray.actors.wire import tree_from_wire, tree_to_wire
from zetta_ray.errors import DeadlineExceeded
from zetta_ray.runtime.expert_client import attach_experts

__all__ = ["DenseReplica", "DenseReplicaActor", "split_outputs"]

Send = Callable[[int, int, int, np.ndarray], None]  # (epoch, pass, bucket, flat)


def split_outputs(out: Any) -> tuple[int, list[torch.Tensor]]:
    """The loss and the other tensors of a forward's result: ``(loss_index, outputs)``.

    A model returns its loss (a 0-d tensor) alone, or a tuple/list of tensors of which exactly one is
    0-d (``logits, loss = model(x, y)``)."""
    outputs = list(out) if isinstance(out, (tuple, list)) else [out]
    if not all(isinstance(t, torch.Tensor) for t in outputs):
        kinds = [type(t).__name__ for t in outputs]
        raise TypeError(
            f"a data-parallel model must return tensors (its loss, or a tuple with the loss), got {kinds}"
        )
    scalars = [i for i, t in enumerate(outputs) if t.dim() == 0]
    if len(scalars) != 1:
        shapes = [tuple(t.shape) for t in outputs]
        raise TypeError(
            f"a data-parallel model's forward must return exactly one 0-d loss tensor (alone or in a "
            f"tuple such as (logits, loss)); got outputs of shapes {shapes}"
        )
    return scalars[0], outputs


def _tensor(a: Any) -> Any:
    """An argument as the model takes it: an array as a tensor (a read-only one, as Ray delivers
    arguments, copied: torch does not take read-only memory), anything else as it is."""
    if not isinstance(a, np.ndarray):
        return a
    return torch.from_numpy(a if a.flags.writeable else a.copy())


class DenseReplica:
    """Replica ``rank`` of ``world``: a copy of ``module`` and its optimizer. See the module docstring."""

    def __init__(
        self,
        rank: int,
        world: int,
        module: nn.Module,
        *,
        seed: int = 0,
        threads: int = 1,
        bucket_bytes: int = 25 * 2**20,
        send: Send | None = None,
        deadline_s: float = 60.0,
        experts: dict[str, Any] | None = None,
        incarnation: int = 0,
    ):
        torch.set_num_threads(threads)
        self.seed = seed
        self.rank, self.world = rank, world
        self.module = module
        # with expert parallelism: the MoE layers call the shared expert units (runtime/expert_client.py)
        self.experts = attach_experts(module, source=(rank, incarnation), **experts) if experts else None
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.send = send
        self.deadline_s = deadline_s
        self.buckets = GradBuckets(self.params, bucket_bytes=bucket_bytes, on_ready=self._ready)
        self.buckets.arm()
        self.optimizer: torch.optim.Optimizer | None = None
        self.steps_applied = 0
        self.epoch = 0  # gradient epoch: zero_grad() calls applied
        self.passes = 0  # backward passes in this epoch
        self._loss: torch.Tensor | None = None
        self._outputs: list[torch.Tensor] = []
        self.inbox = BucketInbox()  # the peers' copies of this replica's buckets
        self.sent: dict[tuple[int, int], dict[int, np.ndarray]] = {}  # own copies of this epoch, by pass
        self.state_lock = threading.Lock()  # held while the parameters or the epoch change
        self.timings: dict[str, float] = {}  # the last step's, for benchmarks (``ping``)
        self._clock = {"first_ready": 0.0, "backward_end": 0.0}

    # -- dataflow ---------------------------------------------------------------------------------

    def forward(self, args: Sequence[Any], kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
        """Run the model on this replica's shard (numpy arrays become tensors); keep the graph for
        ``backward``. Returns the loss as a float, where it sits among the outputs, and their shapes."""
        # dropout: a seed of (run seed, rank, epoch, pass), so that a replayed forward draws the same
        torch.manual_seed(hash((self.seed, self.rank, self.epoch, self.passes)) & (2**63 - 1))
        tensors = [_tensor(a) for a in args]
        kw = {k: _tensor(v) for k, v in (kwargs or {}).items()}
        loss_index, outputs = split_outputs(self.module(*tensors, **kw))
        self._loss = outputs[loss_index]
        self._outputs = outputs
        return {
            "loss": float(self._loss.detach()),
            "loss_index": loss_index,
            "n_outputs": len(outputs),
            "shapes": [tuple(t.shape) for t in outputs],
            "rank": self.rank,
        }

    def output(self, index: int) -> np.ndarray:
        """Output ``index`` of the last forward, as an array (for a caller that reads the logits)."""
        return self._outputs[index].detach().numpy().copy()

    def backward(self) -> None:
        """Backward of the last forward's loss; full buckets leave for the other replicas meanwhile."""
        if self._loss is None:
            raise RuntimeError(f"replica {self.rank}: backward() without a forward() since the last one")
        start = time.perf_counter()
        self.passes += 1
        self.buckets.reset()
        self._loss.backward()
        self.buckets.finish()  # buckets of parameters this pass did not reach (their gradients: zeros)
        self._loss, self._outputs = None, [o.detach() for o in self._outputs]
        self._clock["backward_end"] = time.perf_counter()
        self.timings["backward_s"] = self._clock["backward_end"] - start

    def _ready(self, bucket: int, flat: np.ndarray) -> None:
        own = self.sent.setdefault((self.epoch, self.passes), {})
        if not own:
            self._clock["first_ready"] = time.perf_counter()
        own[bucket] = flat
        if self.send is not None:
            self.send(self.epoch, self.passes, bucket, flat)

    def receive(self, epoch: int, passes: int, rank: int, bucket: int, flat: np.ndarray) -> None:
        """Take replica ``rank``'s copy of ``bucket`` from backward pass ``passes`` of gradient epoch
        ``epoch``. A copy of an older pass of the epoch is superseded by the newer one."""
        self.inbox.put(epoch, passes, rank, bucket, flat)

    def reduce(self, passes: int) -> None:
        """Wait for every replica's copy of every bucket of pass ``passes`` of this epoch, then write
        the replica-order means into ``.grad``. ``DeadlineExceeded`` names the replicas still missing."""
        wait_start = time.perf_counter()

        def late(missing: list[int]) -> Exception:
            return DeadlineExceeded(
                unit=self.rank,
                experts=[],
                step=self.steps_applied,
                phase=f"gradient reduction (waiting for replicas {missing})",
                deadline_s=self.deadline_s,
            )

        n = len(self.buckets.buckets)
        copies = self.inbox.take((self.epoch, passes), self.world, n, self.deadline_s, late)
        self._time_exchange(wait_start)
        reduce_into(self.buckets, copies, self.world)

    def _time_exchange(self, wait_start: float) -> None:
        """The last exchange: from this replica's first bucket out to the last copy in (``exchange_s``),
        how much of it came after its backward ended (``exposed_s``), and the wait in ``reduce``."""
        c = self._clock
        self.timings["reduce_wait_s"] = time.perf_counter() - wait_start
        last = self.inbox.last_arrival
        self.timings["exchange_s"] = max(0.0, last - c["first_ready"])
        self.timings["exposed_s"] = max(0.0, last - c["backward_end"])

    def step(self, passes: int) -> None:
        """Reduce this epoch's gradients (``passes`` backward passes) and apply the optimizer."""
        if self.optimizer is None:
            raise RuntimeError(f"replica {self.rank}: step() before set_optimizer()")
        if passes > 0:
            self.reduce(passes)
        with self.state_lock:
            self.optimizer.step()
            self.steps_applied += 1
            if self.experts is not None:
                self.experts.count_step()  # the controller steps the expert units

    def zero_grad(self) -> None:
        with self.state_lock:
            self.module.zero_grad(set_to_none=True)
            self.epoch += 1
            self.passes = 0
            self.sent = {}
            if self.experts is not None:
                self.experts.zero_grad()

    def train(self, mode: bool) -> None:
        self.module.train(mode)

    def set_optimizer(self, optimizer_cls: type[torch.optim.Optimizer], kwargs: dict[str, Any]) -> None:
        self.optimizer = optimizer_cls(self.params, **kwargs)

    # -- state --------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, np.ndarray]:
        return {k: v.detach().numpy().copy() for k, v in self.module.state_dict().items()}

    def optimizer_state(self) -> dict[str, Any]:
        return tree_to_wire(self.optimizer.state_dict()) if self.optimizer is not None else {}

    def state(self) -> dict[str, Any]:
        """Everything a replacement needs to continue as this replica's sibling: parameters, optimizer
        state, steps applied, gradient epoch (RNG is per rank, so it is not copied)."""
        return {
            "module": self.state_dict(),
            "optimizer": self.optimizer_state(),
            "steps_applied": self.steps_applied,
            "epoch": self.epoch,
            "training": self.module.training,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state["module"].items()})
        if state["optimizer"]:
            self.optimizer.load_state_dict(tree_from_wire(state["optimizer"]))
        self.steps_applied = state["steps_applied"]
        self.epoch = state["epoch"]
        self.passes = 0
        if self.experts is not None:
            self.experts.sync(self.steps_applied, self.epoch)
        self.module.train(state["training"])

    def load_state_dict(self, tensors: dict[str, np.ndarray]) -> None:
        self.module.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in tensors.items()})

    def rewind(self, units: list[Any], incarnation: int) -> None:
        """A shared expert unit failed and every expert unit went back to the step's start: forget this
        epoch's passes and gradients, call ``units`` (the rebuilt one among them) as ``incarnation``
        (the units drop what the old one added), and take the replayed calls that follow. Peers' bucket
        copies already received stay: the replay sends the same values again."""
        with self.state_lock:
            self.module.zero_grad(set_to_none=True)
            self.passes, self.sent, self._loss = 0, {}, None
            self.buckets.reset()
            if self.experts is not None:
                self.experts.units = list(units)
                self.experts.source = (self.rank, incarnation)
                self.experts.sync(self.steps_applied, self.epoch)

    def own_buckets(self) -> list[tuple[int, int, int, np.ndarray]]:
        """This replica's copies of the buckets it sent this epoch: ``(epoch, pass, bucket, flat)``."""
        return [(e, p, b, flat) for (e, p), held in list(self.sent.items()) for b, flat in list(held.items())]

    def ping(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id() if ray.is_initialized() else None,
            "steps_applied": self.steps_applied,
            "epoch": self.epoch,
            "timings": dict(self.timings),
        }


class _ReplicaProcess(DenseReplica):
    """The actor's body: a DenseReplica whose buckets go to its peers through the object store."""

    def __init__(self, rank: int, world: int, module: nn.Module, **options: Any):
        super().__init__(rank, world, module, send=self._to_peers, **options)
        self.peers: list[Any] = []
        self._peer_lock = threading.Lock()

    @ray.method(concurrency_group="peers")
    def connect(self, peers: list[Any], fresh: int | None = None) -> None:
        """The replica actors by rank (this one's own entry is not called). ``fresh``: the rank of a
        replacement, which is sent this replica's buckets of this epoch that its predecessor got."""
        with self._peer_lock:
            self.peers = list(peers)
            if fresh is not None and fresh != self.rank:
                for epoch, passes, bucket, flat in self.own_buckets():
                    self.peers[fresh].receive.remote(epoch, passes, self.rank, bucket, ray.put(flat))

    @ray.method(concurrency_group="peers")
    def state(self) -> dict[str, Any]:
        """As ``DenseReplica.state``, served while this replica may be waiting in its reduction."""
        return super().state()

    def _to_peers(self, epoch: int, passes: int, bucket: int, flat: np.ndarray) -> None:
        self.receive(epoch, passes, self.rank, bucket, flat)
        ref = ray.put(flat)  # once, whatever the number of peers
        with self._peer_lock:
            for r, peer in enumerate(self.peers):
                if r != self.rank:
                    peer.receive.remote(epoch, passes, self.rank, bucket, ref)

    @ray.method(concurrency_group="peers")
    def receive(self, epoch: int, passes: int, rank: int, bucket: int, flat: np.ndarray) -> None:
        super().receive(epoch, passes, rank, bucket, flat)


DenseReplicaActor = ray.remote(max_restarts=0, max_task_retries=0, concurrency_groups={"peers": 1})(
    _ReplicaProcess
)
