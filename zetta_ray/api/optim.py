"""The distributed optimizer: dense parameters step here, expert parameters step in their units."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from zetta_ray.runtime.engine import ExpertRuntime

__all__ = ["DistributedOptimizer"]


class DistributedOptimizer:
    """Looks like a ``torch.optim.Optimizer`` to the training loop.

    ``step()`` first tells every unit to step its experts (fire-and-forget, so the units and this process
    step at the same time), then steps the dense parameters here. Expert optimizer state never leaves its
    unit except through ``state_dict()``.
    """

    def __init__(
        self,
        local: torch.optim.Optimizer,
        runtime: ExpertRuntime,
        after_step: Callable[[], None] | None = None,
    ):
        self.local = local
        self._runtime = runtime
        self._after_step = after_step  # the module's durable checkpoint hook

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.local.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._runtime.zero_grad()
        self.local.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        self._runtime.step_experts()
        self.local.step()
        if self._after_step is not None:
            self._after_step()

    def state_dict(self) -> dict[str, Any]:
        """``{"dense": <torch optimizer state>, "experts": [<state of unit 0>, ...]}`` (numpy tensors)."""
        return {"dense": self.local.state_dict(), "experts": self._runtime.optimizer_state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.local.load_state_dict(state["dense"])
        self._runtime.load_optimizer_state_dict(state["experts"])
