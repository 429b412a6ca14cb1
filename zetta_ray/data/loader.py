"""A deterministic, sharded loader of token windows from a ``Corpus``.

Rank ``r`` of ``w`` data-parallel ranks reads the training shards ``r::w`` (disjoint across ranks, and
together all of them). A shard of ``n`` tokens holds ``(n - 1) // seq_len`` windows of ``seq_len + 1``
tokens, starting every ``seq_len`` tokens, so consecutive windows share one token and every next-token
pair inside a shard is trained on once per epoch.

Order: in epoch ``e`` the rank visits its shards in a permutation drawn from ``(seed, e, rank)``, and the
windows of each shard in a permutation drawn from ``(seed, e, shard)``. Batch ``step`` is rows
``step * B ... step * B + B - 1`` of that sequence (continuing into the next epoch at the end). The batch
is therefore a pure function of (corpus, seed, rank, world, batch size, seq_len, step): the loader's
whole position is ``LoaderState``, a handful of integers that msgpack or pickle can carry, and loading
it makes the next batches identical to the ones an uninterrupted run would have seen.

Shape legend: B = batch, S = seq_len
"""

from __future__ import annotations

import bisect
import itertools
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch

from zetta_ray.data.corpus import Corpus
from zetta_ray.errors import ConfigError

__all__ = ["LoaderState", "TokenLoader"]


@dataclass(frozen=True, kw_only=True, slots=True)
class LoaderState:
    """A loader's exact position: ``step`` is the next batch it yields; the other fields say which
    stream of batches the step counts in, and must match the loader that resumes from it."""

    corpus: str
    split: str
    seed: int
    rank: int
    world: int
    batch_size: int
    seq_len: int
    step: int

    def to_dict(self) -> dict[str, Any]:
        """Plain ``str``/``int`` values: safe for msgpack, JSON or a checkpoint manifest."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> LoaderState:
        names = {f.name for f in fields(cls)}
        if set(values) != names:
            raise ConfigError(
                f"loader state has keys {sorted(values)}, expected {sorted(names)}; pass the mapping that "
                "LoaderState.to_dict() produced"
            )
        return cls(**values)


def _positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"TokenLoader({name}={value!r}) is invalid: {name} must be a positive integer")


class TokenLoader:
    """Yields ``(x_BS, y_BS)`` int64 batches forever: ``x = w[:, :-1]``, ``y = w[:, 1:]`` of windows ``w``.

    >>> loader = TokenLoader(corpus, batch_size=8, seq_len=128, seed=0)
    >>> x, y = next(loader)                  # step 0
    >>> saved = loader.state().to_dict()     # {"step": 1, ...}
    >>> loader.load_state(saved)             # later, or in another process: continue at step 1
    """

    _CACHED_SHARDS = 2

    def __init__(
        self,
        corpus: Corpus,
        *,
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        split: str = "train",
    ):
        for name, value in (("batch_size", batch_size), ("seq_len", seq_len), ("world", world)):
            _positive(name, value)
        if not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"TokenLoader(seed={seed!r}) is invalid: seed must be an integer >= 0")
        if not isinstance(rank, int) or not 0 <= rank < world:
            raise ConfigError(f"TokenLoader(rank={rank!r}) is invalid: rank must be in [0, world={world})")
        shards = corpus.split(split)
        if len(shards) < world:
            raise ConfigError(
                f"world={world} ranks need at least {world} {split} shards, but the corpus at "
                f"{str(corpus.dir)!r} has {len(shards)}; build it with a smaller CorpusSpec.shard_bytes "
                "or a larger max_bytes"
            )
        self.corpus = corpus
        self.split, self.seed, self.rank, self.world = split, seed, rank, world
        self.batch_size, self.seq_len = batch_size, seq_len
        self.shards = shards[rank::world]
        self._shard_ids = [shards.index(s) for s in self.shards]  # position within the split
        self._windows = [max(0, (s.tokens - 1) // seq_len) for s in self.shards]
        self.windows_per_epoch = sum(self._windows)
        if self.windows_per_epoch == 0:
            raise ConfigError(
                f"rank {rank}'s {split} shards hold {sum(s.tokens for s in self.shards)} tokens, too few for "
                f"one window of seq_len + 1 = {seq_len + 1}; use a shorter seq_len or a larger corpus"
            )
        self.step = 0
        self._tokens: OrderedDict[int, np.ndarray] = OrderedDict()
        self._orders: dict[tuple[int, int], np.ndarray] = {}
        self._epoch_plan: tuple[int, np.ndarray, list[int]] | None = None

    # -- position -------------------------------------------------------------------------------------

    def state(self) -> LoaderState:
        return LoaderState(
            corpus=self.corpus.fingerprint,
            split=self.split,
            seed=self.seed,
            rank=self.rank,
            world=self.world,
            batch_size=self.batch_size,
            seq_len=self.seq_len,
            step=self.step,
        )

    def load_state(self, state: LoaderState | Mapping[str, Any]) -> None:
        """Continue at ``state.step``. Every other field must equal this loader's, or the same step would
        name a different batch; a mismatch is an error that lists the differing fields."""
        if not isinstance(state, LoaderState):
            state = LoaderState.from_dict(state)
        mine = self.state()
        diff = {
            f.name: (getattr(state, f.name), getattr(mine, f.name))
            for f in fields(LoaderState)
            if f.name != "step" and getattr(state, f.name) != getattr(mine, f.name)
        }
        if diff:
            raise ConfigError(
                f"loader state does not fit this loader: {diff} as {{field: (saved, this loader)}}; resume "
                "with the corpus, seed, rank, world, batch_size and seq_len of the saved run"
            )
        if not isinstance(state.step, int) or state.step < 0:
            raise ConfigError(f"LoaderState.step={state.step!r} is invalid: must be an integer >= 0")
        self.step = state.step

    @property
    def epoch(self) -> int:
        """The epoch of the next batch's first row."""
        return self.step * self.batch_size // self.windows_per_epoch

    # -- batches ----------------------------------------------------------------------------------------

    def windows(self, step: int) -> torch.Tensor:
        """Batch ``step`` as ``(B, S + 1)`` int64 token windows. Does not move the loader."""
        first = step * self.batch_size
        rows = [self._window(i) for i in range(first, first + self.batch_size)]
        return torch.from_numpy(np.stack(rows).astype(np.int64))

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_BS, y_BS)`` of batch ``step``: inputs and next-token targets. Does not move the loader."""
        w = self.windows(step)
        return w[:, :-1], w[:, 1:]

    def __iter__(self) -> TokenLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.batch(self.step)
        self.step += 1
        return out

    def locate(self, index: int) -> tuple[str, int]:
        """Where row ``index`` of the loader's sequence comes from: ``(shard name, token offset)``."""
        k, start = self._locate(index)
        return self.shards[k].name, start

    # -- internals --------------------------------------------------------------------------------------

    def _plan(self, epoch: int) -> tuple[np.ndarray, list[int]]:
        """This epoch's shard order and the cumulative window counts along it."""
        if self._epoch_plan is None or self._epoch_plan[0] != epoch:
            order = np.random.default_rng([self.seed, epoch, self.rank]).permutation(len(self.shards))
            starts = list(itertools.accumulate((self._windows[k] for k in order), initial=0))
            self._epoch_plan = (epoch, order, starts)
            self._orders.clear()
        return self._epoch_plan[1], self._epoch_plan[2]

    def _locate(self, index: int) -> tuple[int, int]:
        if index < 0:
            raise ConfigError(f"step and index must be >= 0, got row index {index}")
        epoch, i = divmod(index, self.windows_per_epoch)
        order, starts = self._plan(epoch)
        pos = bisect.bisect_right(starts, i) - 1
        k = int(order[pos])
        key = (epoch, k)
        if key not in self._orders:
            rng = np.random.default_rng([self.seed, epoch, self._shard_ids[k], 1])
            self._orders[key] = rng.permutation(self._windows[k])
        return k, int(self._orders[key][i - starts[pos]]) * self.seq_len

    def _window(self, index: int) -> np.ndarray:
        k, start = self._locate(index)
        if k not in self._tokens:
            self._tokens[k] = self.corpus.read(self.shards[k])
            while len(self._tokens) > self._CACHED_SHARDS:
                self._tokens.popitem(last=False)
        self._tokens.move_to_end(k)
        return self._tokens[k][start : start + self.seq_len + 1]

    def __repr__(self) -> str:
        return (
            f"TokenLoader({self.split}, rank {self.rank}/{self.world}, {len(self.shards)} shards, "
            f"{self.windows_per_epoch} windows/epoch, B={self.batch_size}, S={self.seq_len}, "
            f"step={self.step})"
        )
