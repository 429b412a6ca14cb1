"""Per-source gradients of an expert unit shared by data-parallel replicas.

With ``zr.DataParallel`` and ``zr.ExpertParallel`` together, every replica's MoE layers send their rows
straight to the same expert units. Their backward calls reach a unit in whatever order the network
delivers them, and floating-point sums depend on order; so a unit does not add a replica's gradients
into ``.grad`` as they come. ``SourceGrads`` keeps each source's sum apart (the source is the replica's
rank and its incarnation, carried in every save key: ``(step, layer, micro-batch, rank, incarnation)``)
and at the optimizer step writes the mean over the replicas, summed in rank order, into ``.grad``: the
result never depends on arrival order, and equals what one process accumulating ``loss_r / D`` over the
replicas' shards gets, up to float rounding.

A replica that died and was rebuilt from a sibling replays its step's calls under a new incarnation:
the unit then drops what the dead incarnation had added (it may have reached the unit only in part), and
ignores that incarnation's calls from then on. Pure PyTorch, no Ray.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = ["Source", "SourceGrads"]

Source = tuple[int, int]  # (replica rank, incarnation)


class SourceGrads:
    """The gradients each replica has sent ``params`` this step, by rank. See the module docstring."""

    def __init__(self, params: Sequence[torch.nn.Parameter]):
        self.params = list(params)
        self._grads: dict[int, tuple[int, list[torch.Tensor | None]]] = {}  # rank -> (incarnation, grads)
        self._newest: dict[int, int] = {}  # rank -> the newest incarnation seen (kept across steps)

    def accumulate(self, source: Source, backward: Callable[[], None]) -> bool:
        """Run ``backward`` (which adds into ``.grad``) into ``source``'s own sums. Returns False (and
        runs nothing) for a call of an incarnation older than one already seen for its rank."""
        rank, incarnation = source
        if self._newest.get(rank, incarnation) > incarnation:
            return False
        self._newest[rank] = incarnation
        held = self._grads.get(rank)
        mine = held[1] if held is not None and held[0] == incarnation else [None] * len(self.params)
        outside = [p.grad for p in self.params]
        for p, g in zip(self.params, mine, strict=True):
            p.grad = g
        try:
            backward()
        finally:
            self._grads[rank] = (incarnation, [p.grad for p in self.params])
            for p, g in zip(self.params, outside, strict=True):
                p.grad = g
        return True

    def write_mean(self, replicas: int) -> None:
        """``.grad`` = the sum over ranks 0, 1, ... of their sums, divided by ``replicas``; a rank that
        sent nothing counts zeros. The sums are then forgotten."""
        for i, p in enumerate(self.params):
            total: torch.Tensor | None = None
            for rank in sorted(self._grads):
                g = self._grads[rank][1][i]
                if g is not None:
                    total = g.clone() if total is None else total.add_(g)
            p.grad = None if total is None else total.div_(replicas)
        self._grads.clear()

    def clear(self) -> None:
        self._grads.clear()

    def __bool__(self) -> bool:
        return bool(self._grads)
