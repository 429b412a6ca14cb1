"""Which compute unit hosts each expert of each MoE layer. Pure; no Ray."""

from __future__ import annotations

from dataclasses import dataclass

from zetta_ray.errors import ConfigError

__all__ = ["Layout"]


@dataclass(frozen=True, slots=True)
class Layout:
    """Which unit hosts each expert: ``unit_LE[layer][expert]``.

    ``Layout.blocks`` gives unit ``u`` experts ``[u * k, (u + 1) * k)`` of every layer; a placer may give
    any assignment (``Layout(n_units, unit_LE)``), e.g. more experts on faster units.
    """

    n_units: int
    unit_LE: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        for layer, units in enumerate(self.unit_LE):
            bad = [u for u in units if not 0 <= u < self.n_units]
            if bad:
                raise ConfigError(
                    f"layout of MoE layer {layer} names units {bad} outside 0..{self.n_units - 1}"
                )

    @classmethod
    def blocks(cls, n_units: int, experts_per_layer: tuple[int, ...]) -> Layout:
        for layer, n in enumerate(experts_per_layer):
            if n % n_units:
                raise ConfigError(
                    f"expert degree ({n_units}) must divide the number of experts ({n}) of MoE layer "
                    f"{layer}; choose a degree among the divisors of {n}"
                )
        return cls(n_units, tuple(tuple(e * n_units // n for e in range(n)) for n in experts_per_layer))

    def unit_of(self, layer: int, expert: int) -> int:
        return self.unit_LE[layer][expert]

    def experts_of(self, unit: int) -> list[tuple[int, int]]:
        return [(l, e) for l, units in enumerate(self.unit_LE) for e, u in enumerate(units) if u == unit]

    def experts_in_layer(self, unit: int, layer: int) -> list[int]:
        return [e for e, u in enumerate(self.unit_LE[layer]) if u == unit]
