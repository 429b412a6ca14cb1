"""Quantities as text: the one formatter of byte counts (and other amounts) in messages and reports.

``format_amount(n)`` writes ``n`` with the largest prefix whose scale it reaches and three significant
digits: ``format_amount(8.39e6) == "8.39 MB"``. The prefixes are SI (``k``, ``M``, ``G``, ``T``, ``P``)
by default; pass ``prefixes=BINARY`` for ``KiB``, ``MiB``, ... A number below every prefix is written in
the bare unit (an integer as it is). ``unit`` names other amounts (``"params"``, ``"B/s"``) and ``spec``
the number's format. ``gib`` and ``mib`` are the two fixed forms that errors use. Pure Python, no Ray.
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral

__all__ = ["BINARY", "SI", "format_amount", "gib", "mib"]

#: (prefix, scale), largest first.
SI: tuple[tuple[str, float], ...] = (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3))
BINARY: tuple[tuple[str, float], ...] = (
    ("Pi", 2.0**50),
    ("Ti", 2.0**40),
    ("Gi", 2.0**30),
    ("Mi", 2.0**20),
    ("Ki", 2.0**10),
)


def format_amount(
    n: float,
    unit: str = "B",
    *,
    prefixes: Sequence[tuple[str, float]] = SI,
    spec: str = ".3g",
    fixed: bool = False,
) -> str:
    """``n`` in ``unit`` with the largest of ``prefixes`` whose scale ``|n|`` reaches, formatted by ``spec``.

    ``fixed=True`` always uses the first prefix, however small ``n`` is. Below every scale, ``n`` is
    written in the bare unit: an integer as it is, anything else by ``spec``.
    """
    for prefix, scale in prefixes:
        if fixed or abs(n) >= scale:
            return f"{n / scale:{spec}} {prefix}{unit}"
    if isinstance(n, Integral) and not isinstance(n, bool):
        return f"{n} {unit}"
    return f"{n:{spec}} {unit}"


def gib(n: float) -> str:
    """``n`` bytes in GiB, three significant digits, whatever its size: ``gib(2**29) == "0.5 GiB"``."""
    return format_amount(n, prefixes=BINARY[2:3], fixed=True)


def mib(n: int) -> str:
    """``n`` bytes in MiB to one decimal from 1 MiB up, else in bytes: ``"33.0 MiB"``, ``"512 B"``."""
    return format_amount(n, prefixes=BINARY[3:4], spec=".1f")
