"""The autograd bridge: makes ``loss.backward()`` drive the experts' remote backward.

``RemoteExperts`` is the ``ExpertExecutor`` that ``zr.parallelize`` installs in every ``MoELayer``.
Shape legend: N = rows grouped by expert, D = model dim, E = experts of one layer
"""

from __future__ import annotations

from typing import Any

import torch

from zetta_ray.runtime.engine import ExpertRuntime

__all__ = ["RemoteExperts"]


class _RemoteExpertsFn(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x_ND: torch.Tensor,
        anchor: torch.Tensor,
        runtime: ExpertRuntime,
        layer: int,
        counts_E: list[int],
    ) -> torch.Tensor:
        y_ND, ticket = runtime.forward(layer, x_ND, counts_E, keep=True, input_grad=ctx.needs_input_grad[0])
        ctx.runtime, ctx.ticket = runtime, ticket
        return y_ND

    @staticmethod
    def backward(ctx: Any, dy_ND: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return ctx.runtime.backward(ctx.ticket, dy_ND), None, None, None, None


class RemoteExperts:
    """Runs one MoE layer's experts on the runtime's units.

    With gradients enabled the forward goes through an autograd Function whose backward sends output
    gradients to the units. ``anchor`` is a scalar that requires grad, so the bridge takes part in backward
    (and the experts get parameter gradients) even when the rows themselves need no gradient.
    """

    def __init__(self, runtime: ExpertRuntime, layer: int):
        self.runtime = runtime
        self.layer = layer
        self._anchor = torch.zeros((), requires_grad=True)

    def __call__(self, x_ND: torch.Tensor, counts_E: list[int]) -> torch.Tensor:
        if torch.is_grad_enabled():
            return _RemoteExpertsFn.apply(x_ND, self._anchor, self.runtime, self.layer, counts_E)
        y_ND, _ = self.runtime.forward(self.layer, x_ND, counts_E, keep=False)
        return y_ND
