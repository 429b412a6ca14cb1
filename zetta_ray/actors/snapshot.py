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
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from zetta_ray.checkpoint import Snapshot

if TYPE_CHECKING:
    from zetta_ray.actors.compute_unit import ComputeUnit

__all__ = ["restore_unit", "unit_snapshot"]


def unit_snapshot(unit: ComputeUnit, step: int, *, copy: bool = True) -> Snapshot:
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
            "grad_epoch": unit._grad_epoch,
            "optimizer_class": type(optimizer).__name__ if optimizer is not None else None,
        },
    )


def _rng_at_step(unit: ComputeUnit) -> torch.Tensor:
    """The RNG state as of the unit's last optimizer step: a snapshot taken later in a step (after a
    replacement's replayed forwards) must not include what those forwards drew, since a restore replays
    them again."""
    return unit.rng_at_step if unit.rng_at_step is not None else torch.get_rng_state()


def restore_unit(unit: ComputeUnit, snapshot: Snapshot) -> int:
    """Load ``snapshot`` into ``unit`` (a fresh one, or one to roll back); return the snapshot's step.

    Parameters are copied in place, so an optimizer built on them stays valid. If the unit has no
    optimizer yet and the snapshot has optimizer state of a ``torch.optim`` class, that optimizer is
    built first (its hyperparameters come from the saved param groups); for any other class call
    ``set_optimizer`` before restoring. A snapshot taken before ``set_optimizer`` leaves the unit
    without an optimizer, as it was. Activations and gradients are cleared: calls of the unfinished
    step are to be replayed from the start.
    """
    experts = [tuple(k) for k in snapshot.mesh.get("experts", [])]
    if experts and experts != sorted(unit.experts):
        raise ValueError(
            f"snapshot of unit {snapshot.mesh.get('unit')} (experts {experts}) cannot restore unit "
            f"{unit.unit_id}, which hosts experts {sorted(unit.experts)}; build the replacement unit with "
            "the same experts as the unit that died"
        )
    unit.load_state_dict(snapshot.tensors)
    if snapshot.optimizer:
        if unit.optimizer is None:
            unit.optimizer = _build_optimizer(unit, snapshot.extra.get("optimizer_class"))
        else:
            _check_optimizer_class(unit, snapshot.extra.get("optimizer_class"))
        unit.load_optimizer_state_dict(snapshot.optimizer)
    else:
        unit.optimizer = None  # taken before set_optimizer: so is the restored unit
    rng = torch.from_numpy(np.ascontiguousarray(snapshot.rng["torch"], dtype=np.uint8)).clone()
    torch.set_rng_state(rng)
    unit.rng_at_step = rng
    unit.steps_applied = int(snapshot.extra["steps_applied"])
    unit._grad_epoch = int(snapshot.extra["grad_epoch"])
    unit._saved.clear()
    unit.zero_grad()
    return snapshot.step


def _build_optimizer(unit: ComputeUnit, name: Any) -> torch.optim.Optimizer:
    cls = getattr(torch.optim, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ValueError(
            f"unit {unit.unit_id}: the snapshot holds state of optimizer {name!r}, which is not a "
            "torch.optim class; call set_optimizer(cls, kwargs) on the unit before restoring it"
        )
    params = [p for key in sorted(unit.experts) for p in unit.experts[key].parameters()]
    return cls(params)


def _check_optimizer_class(unit: ComputeUnit, name: Any) -> None:
    have = type(unit.optimizer).__name__
    if name is not None and name != have:
        raise ValueError(
            f"unit {unit.unit_id} has a {have} optimizer but the snapshot holds {name} state; call "
            f"set_optimizer with {name} (or restore into a unit without an optimizer)"
        )
