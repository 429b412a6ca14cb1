"""ComputeUnit: the actor that hosts experts.

A unit owns its experts' parameters, their gradients and their optimizer state; none of these ever leave
it except as a snapshot. Forward keeps what backward needs under a key (step, layer, micro-batch);
backward accumulates parameter gradients here and returns only input gradients; ``step`` applies the
unit's own optimizer. Shared by data-parallel replicas, a unit keeps each replica's gradients apart
until the step (``actors/sources.py``).

Expert keys are ``(layer, expert)``; in state dicts a parameter is named ``"{layer}.{expert}.{name}"``.
Shape legend: N = rows sent to this unit (its experts' rows, grouped by expert), D = model dim
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from typing import Any

import numpy as np
import ray
import torch
from torch import nn

from zetta_ray.actors.shm import SharedRows
from zetta_ray.actors.snapshot import restore_unit, unit_gradients, unit_snapshot
from zetta_ray.actors.sources import SourceGrads
from zetta_ray.actors.staging import SlotWriter, StagedSnapshot, staged_bytes
from zetta_ray.actors.wire import from_wire, reply, to_wire, tree_from_wire, tree_to_wire
from zetta_ray.checkpoint import Snapshot, decode_snapshot

__all__ = ["ComputeUnit", "ComputeUnitActor"]

logger = logging.getLogger(__name__)

ExpertKey = tuple[int, int]
SaveKey = tuple[int, ...]  # (step, layer, micro-batch), then (rank, incarnation) from a replica


class ComputeUnit:
    """Hosts the experts ``skeletons`` names. Skeletons are modules on the meta device (structure only);
    weights arrive through ``load_state_dict``."""

    def __init__(self, unit_id: int, skeletons: dict[ExpertKey, nn.Module], threads: int = 1):
        torch.set_num_threads(threads)
        self.unit_id = unit_id
        self.experts: dict[ExpertKey, nn.Module] = {
            key: skel.to_empty(device="cpu") for key, skel in sorted(skeletons.items())
        }
        self.optimizer: torch.optim.Optimizer | None = None
        self.steps_applied = 0
        self._saved: dict[SaveKey, tuple[torch.Tensor, torch.Tensor]] = {}
        self._sources = SourceGrads(
            [p for key in sorted(self.experts) for p in self.experts[key].parameters()]
        )
        self._delays: dict[str, list[float]] = {}
        self.calls: Counter[str] = Counter()  # calls served, by phase
        self.grad_epoch = 0  # how many zero_grad() the controller has issued that we have applied
        self.rng_at_step: torch.Tensor | None = None  # torch's RNG state after the last optimizer step
        self._slots: SlotWriter | None = SlotWriter()  # shared-memory slots for snapshots (to a pool here)

    # -- dataflow -----------------------------------------------------------------------------------

    def forward(
        self,
        key: SaveKey,
        experts: list[int],
        counts: list[int],
        x_ND: np.ndarray | SharedRows,
        keep: bool,
        grad_epoch: int = 0,
        input_grad: bool = True,
        out: SharedRows | None = None,
    ) -> np.ndarray | SharedRows:
        """Run the listed experts of layer ``key[1]`` on their rows (``counts`` rows each, in order).

        ``keep`` saves what backward needs; ``input_grad`` False tells backward that nobody needs the
        rows' gradients (the layer's input is a leaf), which saves a third of the backward work. Rows
        come as an array or in shared memory (``actors/shm.py``); with ``out`` the outputs are written
        there and ``out`` is returned, else they are returned as an array.
        """
        self._enter("forward", grad_epoch)
        layer = key[1]
        x = from_wire(x_ND)
        with torch.enable_grad() if keep else torch.no_grad():
            if keep:
                x = x.detach().requires_grad_(input_grad)
            chunks = x.split(counts)
            outs = [self.experts[(layer, e)](c) for e, c in zip(experts, chunks, strict=True)]
            y = outs[0] if len(outs) == 1 else torch.cat(outs)
        if keep:
            self._saved[key] = (x, y)
        return reply(y.detach(), out)

    def backward(
        self, key: SaveKey, dy_ND: np.ndarray | SharedRows, grad_epoch: int = 0, out: SharedRows | None = None
    ) -> np.ndarray | SharedRows | None:
        """Accumulate parameter gradients for the forward under ``key``; return its input gradients
        (None when that forward said nobody needs them), written into ``out`` when given (see
        ``forward``)."""
        self._enter("backward", grad_epoch)
        try:
            x, y = self._saved.pop(key)
        except KeyError:
            raise RuntimeError(
                f"unit {self.unit_id} holds no activations for (step, layer, micro-batch)={key}: backward "
                "ran twice for one forward, or after the optimizer step that ended its step"
            ) from None
        dy = from_wire(dy_ND)
        if len(key) == 5:  # from a data-parallel replica: its own sums (actors/sources.py)
            if not self._sources.accumulate((key[3], key[4]), lambda: y.backward(dy)):
                return None  # a dead incarnation's call: its replacement redoes it
        else:
            y.backward(dy)
        return None if x.grad is None else reply(x.grad, out)

    # How the engine sends forward and backward: the rows, and one tuple of the other arguments in the
    # order the method takes them. Ray serializes each argument of a call on its own, on both ends (about
    # 20 us apiece here); an eight-argument forward cost ~0.15 ms more than a two-argument one, 5% of a
    # 16-row expert call (BENCHMARKS.md, dispatch). Rows stay an argument of their own so that Ray
    # resolves them when they come as an ObjectRef.

    def forward_call(self, x_ND: np.ndarray | SharedRows, rest: tuple) -> np.ndarray | SharedRows:
        """``forward(key, experts, counts, x_ND, *flags)`` for ``rest = (key, experts, counts, *flags)``."""
        key, experts, counts, *flags = rest
        return self.forward(key, experts, counts, x_ND, *flags)

    def backward_call(self, dy_ND: np.ndarray | SharedRows, rest: tuple) -> np.ndarray | SharedRows | None:
        """``backward(key, dy_ND, *others)`` for ``rest = (key, *others)``."""
        key, *others = rest
        return self.backward(key, dy_ND, *others)

    # -- optimizer ----------------------------------------------------------------------------------

    def set_optimizer(self, optimizer_cls: type[torch.optim.Optimizer], kwargs: dict[str, Any]) -> None:
        params = [p for key in sorted(self.experts) for p in self.experts[key].parameters()]
        self.optimizer = optimizer_cls(params, **kwargs)

    def zero_grad(self) -> None:
        for expert in self.experts.values():
            expert.zero_grad(set_to_none=True)
        self._sources.clear()

    def step(self, step: int, grad_epoch: int = 0, replicas: int = 0) -> int:
        """Apply this unit's optimizer for ``step`` and drop activations no backward will use. With
        ``replicas`` (data parallelism) the gradients are first the mean of the replicas' sums, in rank
        order (``actors/sources.py``)."""
        self._enter("optimizer", grad_epoch)
        if self.optimizer is None:
            raise RuntimeError(f"unit {self.unit_id}: step({step}) before set_optimizer")
        if replicas:
            self._sources.write_mean(replicas)
        self.optimizer.step()
        self.steps_applied += 1
        self.rng_at_step = torch.get_rng_state()
        self._saved = {k: v for k, v in self._saved.items() if k[0] > step}
        return self.steps_applied

    # -- state --------------------------------------------------------------------------------------

    def state_dict(self, copy: bool = True) -> dict[str, np.ndarray]:
        """Parameters and buffers as numpy arrays: copies, or with ``copy=False`` views of the live
        tensors (see ``actors.snapshot.unit_snapshot``)."""
        return {
            f"{layer}.{expert}.{name}": to_wire(t.clone() if copy else t)
            for (layer, expert), module in self.experts.items()
            for name, t in module.state_dict().items()
        }

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        expected = set(self.state_dict_keys())
        missing, unexpected = expected - set(state), set(state) - expected
        if missing or unexpected:
            raise KeyError(
                f"unit {self.unit_id}: state dict mismatch, missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]}"
            )
        with torch.no_grad():
            for (layer, expert), module in self.experts.items():
                for name, t in module.state_dict(keep_vars=True).items():
                    t.copy_(from_wire(state[f"{layer}.{expert}.{name}"]))

    def state_dict_keys(self) -> list[str]:
        return [
            f"{layer}.{expert}.{name}"
            for (layer, expert), module in self.experts.items()
            for name in module.state_dict()
        ]

    def optimizer_state_dict(self, copy: bool = True) -> dict[str, Any]:
        if self.optimizer is None:
            return {}
        return tree_to_wire(self.optimizer.state_dict(), copy=copy)

    def load_optimizer_state_dict(self, state: dict[str, Any]) -> None:
        if self.optimizer is None:
            raise RuntimeError(f"unit {self.unit_id}: load_optimizer_state_dict before set_optimizer")
        self.optimizer.load_state_dict(tree_from_wire(state))

    # -- what the unit holds ------------------------------------------------------------------------

    @property
    def saved_keys(self) -> list[SaveKey]:
        """The (step, layer, micro-batch) keys of forwards whose activations are kept for backward."""
        return list(self._saved)

    def drop_activations(self) -> None:
        """Forget every kept activation (a restore does: the unfinished step is replayed from its start)."""
        self._saved.clear()

    @property
    def stages_in_shared_memory(self) -> bool:
        """Whether snapshots are staged in shared-memory slots; False once a slot could not be made
        (``/dev/shm`` missing or full), after which they go through Ray's object store."""
        return self._slots is not None

    # -- control ------------------------------------------------------------------------------------

    def ping(self) -> dict[str, Any]:
        return {
            "unit": self.unit_id,
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "steps_applied": self.steps_applied,
            "saved": len(self._saved),
            "calls": dict(self.calls),
        }

    def inject_delay(self, phase: str, seconds: float, times: int = 1) -> None:
        """Fault injection: the next ``times`` calls of ``phase`` sleep ``seconds`` first."""
        self._delays[phase] = [seconds] * times

    def _enter(self, phase: str, grad_epoch: int) -> None:
        """Count the call; zero gradients the controller has zeroed since our last call (its
        ``zero_grad`` only bumps ``grad_epoch``, saving a remote call per unit per step); sleep first if
        a delay was injected for this phase."""
        self.calls[phase] += 1
        if grad_epoch > self.grad_epoch:
            self.grad_epoch = grad_epoch
            self.zero_grad()
        pending = self._delays.get(phase)
        if pending:
            time.sleep(pending.pop())

    # -- snapshots (trickle checkpointing; see actors/snapshot.py and docs/recovery.md) -----------------

    def snapshot(self, step: int, copy: bool = True) -> Snapshot:
        """This unit's state after ``step`` completed optimizer steps.

        Called through Ray, pass ``copy=False``: the returned arrays are then views of the live state,
        and Ray's write of the return value into the object store is the only copy made (it happens
        before this actor runs its next call, so no later step can change the bytes). The fault manager
        does this after every step; MemoryPool actors hold the object store's copy without copying it
        again.
        """
        return unit_snapshot(self, step, copy=copy)

    def gradient_record(self, step: int, copy: bool = True) -> Snapshot:
        """The gradients and hyperparameters of optimizer step ``step``, which redo that step on the
        state before it (``actors.snapshot.unit_gradients``); a third of a snapshot's bytes. Called
        right after ``step`` like ``snapshot``, and through Ray with ``copy=False`` for the same reason."""
        return unit_gradients(self, step, copy=copy)

    def stage_snapshot(self, step: int, slot: str) -> StagedSnapshot | Snapshot:
        """``snapshot(step)`` copied into shared-memory slot ``slot`` for a MemoryPool on this node
        (``actors.staging``): the copy is the staging copy, and only a description goes through Ray.
        Where no slot can be made (``/dev/shm`` missing or full), the snapshot itself, as ``snapshot``
        returns it, from then on."""
        return self._stage(unit_snapshot(self, step, copy=False), slot)

    def stage_gradients(self, step: int, slot: str) -> StagedSnapshot | Snapshot:
        """``gradient_record(step)`` copied into shared-memory slot ``slot`` (see ``stage_snapshot``)."""
        return self._stage(unit_gradients(self, step, copy=False), slot)

    def reserve_slots(self, records: list[str], full: list[str]) -> int:
        """Create the shared-memory slots named, warm (``SlotWriter.reserve``): ``records`` sized for a
        gradient record, ``full`` for a full snapshot (with room for two moments per parameter, as
        Adam's; a bigger state grows its slot). Sent once, before the first step; returns the bytes."""
        if self._slots is None:
            return 0
        params = [p.detach().numpy() for key in sorted(self.experts) for p in self.experts[key].parameters()]
        record = staged_bytes(params)
        state = staged_bytes([t.numpy() for m in self.experts.values() for t in m.state_dict().values()])
        sizes = [(n, record) for n in records] + [(n, state + 2 * record) for n in full]
        try:
            self._slots.reserve(sizes)
        except OSError as e:
            self._no_slots(e)
            return 0
        return sum(size for _, size in sizes)

    def _no_slots(self, e: OSError) -> None:
        logger.warning(
            "unit %d: cannot stage snapshots in shared memory (%s); they go through Ray's "
            "object store from now on. Give /dev/shm more space (docker: --shm-size).",
            self.unit_id,
            e,
        )
        self._slots.forget()
        self._slots = None

    def _stage(self, snapshot: Snapshot, slot: str) -> StagedSnapshot | Snapshot:
        if self._slots is not None:
            try:
                return self._slots.stage(snapshot, slot)
            except OSError as e:
                self._no_slots(e)
        return snapshot  # views of the live state: Ray copies them before this actor's next call

    def snapshot_to(self, step: int, pools: list[Any]) -> list[ray.ObjectRef]:
        """Put this unit's snapshot in the object store once and hand it to each MemoryPool in ``pools``.

        Returns the pools' ``put`` results (ObjectRefs of the byte counts) without waiting for them, so
        the unit goes on serving calls while the snapshot travels. The object belongs to this unit, but
        each pool holds the arrays it received, and a pool's copy outlives this unit (Ray keeps object
        memory that a live process still reads); the returned refs are this unit's (a caller that waits
        on them after the unit died gets an error, and should not count those replicas as stored).
        """
        ref = ray.put(self.snapshot(step, copy=False))  # the one copy, read by every pool
        return [pool.put.remote(self.unit_id, step, ref) for pool in pools]

    def restore(self, snapshot: Snapshot | bytes) -> int:
        """Load a snapshot (a ``Snapshot``, or encoded bytes whose every tensor's sha256 is checked), or
        redo the step of a gradient record on the state restored before it; return its step."""
        if not isinstance(snapshot, Snapshot):
            snapshot = decode_snapshot(snapshot, source=f"unit {self.unit_id} snapshot")
        return restore_unit(self, snapshot)


ComputeUnitActor = ray.remote(max_restarts=0, max_task_retries=0)(ComputeUnit)
