"""What a module on units hands the training loop instead of tensors: the loss and outputs, still on the
units until read, and the split of a batch into equal parts. Pure; no Ray (the callables do the waiting).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from zetta_ray.errors import ConfigError

__all__ = ["RemoteLoss", "RemoteOutput", "split_batch"]


class RemoteLoss:
    """The step's loss, still on the units: ``item()`` / ``float()`` wait for it (the mean of the parts'
    losses, summed in order in float64); ``backward()`` starts (or commits) the units' backward."""

    def __init__(self, losses: Callable[[], list[float]], backward: Callable[[], None], parts: int):
        self._losses, self._backward, self.parts = losses, backward, parts
        self._value: float | None = None

    def item(self) -> float:
        if self._value is None:
            self._value = float(np.mean(np.asarray(self._losses(), dtype=np.float64)))
        return self._value

    def __float__(self) -> float:
        return self.item()

    def backward(self) -> None:
        self._backward()

    def __repr__(self) -> str:
        value = f"{self._value:.6g}" if self._value is not None else "pending"
        return f"RemoteLoss({value}, parts={self.parts})"


class RemoteOutput:
    """An output of the last forward (the logits), left on the units until ``fetch()``."""

    def __init__(self, fetch: Callable[[], np.ndarray]):
        self._fetch = fetch

    def fetch(self) -> torch.Tensor:
        """The whole batch's output, its parts concatenated along dim 0 in order."""
        out = self._fetch()
        return torch.from_numpy(out if out.flags.writeable else out.copy())


Part = tuple[list[Any], dict[str, Any]]  # one part's positional and keyword arguments


def split_batch(args: tuple[Any, ...], kwargs: dict[str, Any], parts: int, who: str) -> list[Part]:
    """The arguments of each of ``parts`` parts: every tensor of one dimension or more split along dim 0
    into equal parts (as numpy); everything else given to every part as it is. ``who`` names the
    strategy in the error for a batch that does not split."""

    def split(name: str, value: Any) -> list[Any]:
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            return [value] * parts
        n = value.shape[0]
        if n % parts:
            raise ConfigError(
                f"{name} has batch size {n} (dim 0 of shape {tuple(value.shape)}), which {who} cannot "
                f"split into {parts} equal parts; use a batch size divisible by {parts}"
            )
        return [c.contiguous().numpy() for c in value.detach().cpu().chunk(parts, dim=0)]

    pos = [split(f"argument {i}", a) for i, a in enumerate(args)]
    kw = {k: split(f"argument {k!r}", v) for k, v in kwargs.items()}
    return [([p[r] for p in pos], {k: v[r] for k, v in kw.items()}) for r in range(parts)]
