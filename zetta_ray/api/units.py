"""``UnitRecord``: what ``DistributedModule.units`` says of each compute unit. Pure; no Ray."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["UnitRecord"]


@dataclass(frozen=True, kw_only=True, slots=True)
class UnitRecord:
    """One compute unit of a ``DistributedModule``.

    Attributes:
        index: the unit's place in ``dmodel.units``: what ``zr.chaos.Kill(target="unit", index=i)``,
            faults and recovery events name.
        role: what the unit runs. ``"expert"``: it hosts experts of the MoE layers; ``"data"``: it is a
            data-parallel replica of a dense model (``zr.DataParallel``); ``"stage"``: it runs a
            pipeline stage, a contiguous run of a dense model's layers (``zr.PipelineParallel``).
        node_id: the Ray node the unit runs on now (after a recovery: its replacement's node).
        experts: the ``(layer, expert)`` pairs it hosts, in order (none for a ``"data"`` unit).
        data_rank: a ``"data"`` unit's replica rank (which shard of each batch it trains on), and a
            ``"stage"`` unit's (its pipeline's rank, with ``zr.DataParallel`` too: 0 without); else None.
        stage: a ``"stage"`` unit's pipeline stage (0 first); else None.
    """

    index: int
    role: str
    node_id: str
    experts: tuple[tuple[int, int], ...]
    data_rank: int | None = None
    stage: int | None = None
