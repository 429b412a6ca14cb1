"""A ComputeUnit's state <-> ``checkpoint.Snapshot``: what a unit must save to be replaced bitwise.

A replacement unit that restores a snapshot and then receives the same calls must compute the same
bits as the unit that never died. That takes more than the weights:

- every parameter and buffer, named ``"{layer}.{expert}.{name}"``: the weights;
- the optimizer's state (AdamW: ``step``, ``exp_avg``, ``exp_avg_sq`` per parameter) and its param
  groups (lr, betas, weight decay): the next update depends on them;
- the optimizer's class name (``extra["optimizer_class"]``): a fresh unit rebuilds a ``torch.optim``
  optimizer before loading its state;
- torch's RNG state as of the last optimizer step (``rng["torch"]``): anything random in an expert
  (dropout, noise) draws the same numbers, also when the snapshot is taken later in a step;
- ``steps_applied`` and the gradient epoch (``extra``): the unit's step count, and when it next zeroes
  its gradients.

Not saved: gradients and the activations forward keeps for backward. A snapshot is taken between an
optimizer step and the next ``zero_grad``, so the gradients are about to be discarded; activations of
a step still in flight are recomputed by replaying that step's logged calls (``control.ReplayLog``).
A training loop that accumulates gradients across optimizer steps (no ``zero_grad``) is therefore not
restored bitwise.

The step is the number of optimizer steps completed, as in ``checkpoint.Snapshot`` and the runtime's
``ExpertRuntime.step`` after ``step_experts``. Restoring does not check it against ``steps_applied``
(a run resumed from a durable checkpoint may count from a later step than its units did).

**Gradient records** (``unit_gradients``) are the cheap kind of snapshot: the gradients one optimizer
step consumed and the hyperparameters it ran with (the param groups' lr, betas, weight decay...), plus
the RNG state and counters after it. A third of a full snapshot's bytes (AdamW keeps two moments per
parameter), and enough to redo that step: ``restore`` of a full snapshot of step ``b`` followed by
``restore`` of the records of steps ``b+1 .. s`` in order leaves the unit bitwise where it was after
step ``s``, because an optimizer step is a deterministic function of the state, the gradients and the
hyperparameters. No forward or backward is recomputed. This holds for optimizers that read ``.grad``
without changing it, as ``torch.optim``'s do; the fault manager takes a full snapshot every
``TrickleCheckpoint.full_every`` steps and records in between (docs/recovery.md).
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from zetta_ray.actors.wire import to_wire, tree_from_wire, tree_to_wire
from zetta_ray.checkpoint import GRADIENT_RECORD, Snapshot

__all__ = ["UnitState", "restore_unit", "unit_gradients", "unit_snapshot"]


class UnitState(Protocol):
    """What a snapshot reads from a unit and a restore sets; ``compute_unit.ComputeUnit`` is one. This
    seam is why this module needs nothing of ``compute_unit`` (which imports it, never the reverse).

    Attributes:
        unit_id: the unit's index, named in errors and in the snapshot's ``mesh``.
        experts: the hosted experts by ``(layer, expert)``; their parameters are what the optimizer steps.
        optimizer: the unit's optimizer, None before ``set_optimizer``; a restore may build one.
        steps_applied: optimizer steps the unit has applied.
        grad_epoch: the controller's ``zero_grad`` count the unit has applied (it zeroes its gradients
            when a call carries a newer one).
        rng_at_step: torch's RNG state right after the last optimizer step, None before the first.
    """

    unit_id: int
    experts: dict[tuple[int, int], nn.Module]
    optimizer: torch.optim.Optimizer | None
    steps_applied: int
    grad_epoch: int
    rng_at_step: torch.Tensor | None

    def state_dict(self, copy: bool = True) -> dict[str, np.ndarray]: ...

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None: ...

    def optimizer_state_dict(self, copy: bool = True) -> dict[str, Any]: ...

    def load_optimizer_state_dict(self, state: dict[str, Any]) -> None: ...

    def zero_grad(self) -> None: ...

    def drop_activations(self) -> None:
        """Forget every activation kept for a backward that has not run."""


def unit_snapshot(unit: UnitState, step: int, *, copy: bool = True) -> Snapshot:
    """The state of ``unit`` after ``step`` completed optimizer steps.

    With ``copy`` (the default) the arrays are copies and the unit may go on. ``copy=False`` gives
    views of the unit's live parameters and optimizer state, for a caller that copies them before the
    unit changes them: a Ray call returning the snapshot does, since Ray writes a return value into the
    object store before the actor runs its next call. That one copy is the trickle checkpoint's
    staging copy.
    """
    optimizer = unit.optimizer
    return Snapshot(
        step=step,
        tensors=unit.state_dict(copy=copy),
        optimizer=unit.optimizer_state_dict(copy=copy),
        rng={"torch": _rng_at_step(unit).numpy().copy()},
        mesh={"unit": unit.unit_id, "experts": [list(k) for k in sorted(unit.experts)]},
        extra={
            "steps_applied": unit.steps_applied,
            "grad_epoch": unit.grad_epoch,
            "optimizer_class": type(optimizer).__name__ if optimizer is not None else None,
        },
    )


def unit_gradients(unit: UnitState, step: int, *, copy: bool = True) -> Snapshot:
    """The gradient record of ``unit``'s optimizer step ``step`` (see the module docstring): taken, like a
    snapshot, after that step and before the gradients are zeroed. ``copy=False`` gives views of the
    live gradients (see ``unit_snapshot``)."""
    optimizer = unit.optimizer
    if optimizer is None:
        raise RuntimeError(f"unit {unit.unit_id}: a gradient record of step {step} before set_optimizer")
    grads = {
        f"{layer}.{expert}.{name}": to_wire(p.grad.clone() if copy else p.grad)
        for (layer, expert), module in unit.experts.items()
        for name, p in module.named_parameters()
        if p.grad is not None
    }
    groups = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    return Snapshot(
        step=step,
        tensors=grads,
        optimizer={"param_groups": tree_to_wire(groups, copy=True)},
        rng={"torch": _rng_at_step(unit).numpy().copy()},
        mesh={"unit": unit.unit_id, "experts": [list(k) for k in sorted(unit.experts)]},
        extra={
            "kind": GRADIENT_RECORD,
            "steps_applied": unit.steps_applied,
            "grad_epoch": unit.grad_epoch,
            "optimizer_class": type(optimizer).__name__,
        },
    )


def _rng_at_step(unit: UnitState) -> torch.Tensor:
    """The RNG state as of the unit's last optimizer step: a snapshot taken later in a step (after a
    replacement's replayed forwards) must not include what those forwards drew, since a restore replays
    them again."""
    return unit.rng_at_step if unit.rng_at_step is not None else torch.get_rng_state()


def restore_unit(unit: UnitState, snapshot: Snapshot) -> int:
    """Load ``snapshot`` into ``unit`` (a fresh one, or one to roll back); return the snapshot's step.

    Parameters are copied in place, so an optimizer built on them stays valid. If the unit has no
    optimizer yet and the snapshot has optimizer state of a ``torch.optim`` class, that optimizer is
    built first (its hyperparameters come from the saved param groups); for any other class call
    ``set_optimizer`` before restoring. A snapshot taken before ``set_optimizer`` leaves the unit
    without an optimizer, as it was. Activations and gradients are cleared: calls of the unfinished
    step are to be replayed from the start.

    A gradient record (``unit_gradients``) instead redoes its optimizer step on the unit's state, which
    must be that of the step before (a full snapshot or record of ``snapshot.step - 1`` restored last).
    """
    _check_experts(unit, snapshot)
    if snapshot.is_gradient_record:
        return _redo_step(unit, snapshot)
    unit.load_state_dict(snapshot.tensors)
    if snapshot.optimizer:
        if unit.optimizer is None:
            unit.optimizer = _build_optimizer(unit, snapshot.extra.get("optimizer_class"))
        else:
            _check_optimizer_class(unit, snapshot.extra.get("optimizer_class"))
        unit.load_optimizer_state_dict(snapshot.optimizer)
    else:
        unit.optimizer = None  # taken before set_optimizer: so is the restored unit
    _set_counters(unit, snapshot)
    return snapshot.step


def _redo_step(unit: UnitState, record: Snapshot) -> int:
    """Apply the optimizer step that ``record`` recorded: its gradients, with its hyperparameters."""
    if unit.optimizer is None:
        raise RuntimeError(
            f"unit {unit.unit_id}: the gradient record of step {record.step} needs the unit's state after "
            f"step {record.step - 1} first; restore that full snapshot before the records after it"
        )
    if unit.steps_applied != int(record.extra["steps_applied"]) - 1:
        raise ValueError(
            f"unit {unit.unit_id} has applied {unit.steps_applied} optimizer steps, but the gradient record "
            f"of step {record.step} was taken after {record.extra['steps_applied']}: records must be "
            "restored in order, each on the state of the step before it"
        )
    _check_optimizer_class(unit, record.extra.get("optimizer_class"))
    groups = tree_from_wire(record.optimizer["param_groups"])
    if len(groups) != len(unit.optimizer.param_groups):
        raise ValueError(
            f"unit {unit.unit_id}: the gradient record of step {record.step} has {len(groups)} param "
            f"groups, the unit's optimizer {len(unit.optimizer.param_groups)}"
        )
    for group, saved in zip(unit.optimizer.param_groups, groups, strict=True):
        group.update(saved)
    for (layer, expert), module in unit.experts.items():
        for name, p in module.named_parameters():
            g = record.tensors.get(f"{layer}.{expert}.{name}")
            p.grad = None if g is None else torch.from_numpy(np.array(g))  # owned, writable
    unit.optimizer.step()
    _set_counters(unit, record)
    return record.step


def _set_counters(unit: UnitState, snapshot: Snapshot) -> None:
    """RNG state, step count and gradient epoch as ``snapshot`` recorded them; no activations, no
    gradients (calls of the unfinished step are replayed from its start)."""
    rng = torch.from_numpy(np.ascontiguousarray(snapshot.rng["torch"], dtype=np.uint8)).clone()
    torch.set_rng_state(rng)
    unit.rng_at_step = rng
    unit.steps_applied = int(snapshot.extra["steps_applied"])
    unit.grad_epoch = int(snapshot.extra["grad_epoch"])
    unit.drop_activations()
    unit.zero_grad()


def _check_experts(unit: UnitState, snapshot: Snapshot) -> None:
    experts = [tuple(k) for k in snapshot.mesh.get("experts", [])]
    if experts and experts != sorted(unit.experts):
        raise ValueError(
            f"snapshot of unit {snapshot.mesh.get('unit')} (experts {experts}) cannot restore unit "
            f"{unit.unit_id}, which hosts experts {sorted(unit.experts)}; build the replacement unit with "
            "the same experts as the unit that died"
        )


def _build_optimizer(unit: UnitState, name: Any) -> torch.optim.Optimizer:
    cls = getattr(torch.optim, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ValueError(
            f"unit {unit.unit_id}: the snapshot holds state of optimizer {name!r}, which is not a "
            "torch.optim class; call set_optimizer(cls, kwargs) on the unit before restoring it"
        )
    params = [p for key in sorted(unit.experts) for p in unit.experts[key].parameters()]
    return cls(params)


def _check_optimizer_class(unit: UnitState, name: Any) -> None:
    have = type(unit.optimizer).__name__
    if name is not None and name != have:
        raise ValueError(
            f"unit {unit.unit_id} has a {have} optimizer but the snapshot holds {name} state; call "
            f"set_optimizer with {name} (or restore into a unit without an optimizer)"
        )
