"""Run configs from TOML: the ``[model]``, ``[train]`` and ``[runtime]`` tables of ``--config FILE.toml``.

``load_config(path, **train_overrides)`` builds a ``RunConfig`` from the dataclass defaults, then the
file, then the overrides (the command-line flags of ``zetta-ray train`` / ``chaos``). The tables map
onto ``zr.MoEConfig``, ``zr.TrainConfig`` and ``zr.RuntimeConfig`` (``zetta_ray/config.py``), which
validate their values; this module rejects what they cannot see: unknown tables, keys that are not
tables, and TOML values of the wrong type. Every error is a ``ConfigError`` naming the table, the key,
the value and what it must be. Pure Python, no Ray.
"""

from __future__ import annotations

import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zetta_ray.config import MoEConfig, RuntimeConfig, TrainConfig, from_mapping
from zetta_ray.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["RunConfig", "load_config"]

_TABLES: dict[str, type] = {"model": MoEConfig, "train": TrainConfig, "runtime": RuntimeConfig}


@dataclass(frozen=True, kw_only=True, slots=True)
class RunConfig:
    """The three configs of one ``zetta-ray train`` run."""

    model: MoEConfig
    train: TrainConfig
    runtime: RuntimeConfig


def _check_types(cls: type, table: str, values: dict[str, Any]) -> None:
    """Reject TOML values of the wrong type, naming the key, the value and the type it must have."""
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        want = hints.get(key)
        if want is None:
            continue  # an unknown key: from_mapping names it
        allowed = typing.get_args(want) if isinstance(want, types.UnionType) else (want,)
        if float in allowed:
            allowed = (*allowed, int)  # TOML writes 1 for 1.0
        if isinstance(value, bool) and bool not in allowed or not isinstance(value, allowed):
            names = " or ".join(t.__name__ for t in allowed if t is not type(None))
            raise ConfigError(
                f"[{table}] {key} = {value!r} is a {type(value).__name__}; {cls.__name__}.{key} takes {names}"
            )


def _read_tables(path: str | Path | None) -> dict[str, Any]:
    """The top-level tables of the TOML file at ``path`` (none without a path), checked by name."""
    tables: dict[str, Any] = {}
    if path is not None:
        try:
            tables = tomllib.loads(Path(path).read_text())
        except OSError as e:
            raise ConfigError(f"--config {str(path)!r}: cannot read it ({e.strerror})") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"--config {str(path)!r} is not valid TOML: {e}") from None
    unknown = sorted(k for k in tables if k not in _TABLES)
    if unknown:
        raise ConfigError(
            f"unknown table(s) or top-level key(s) {unknown} in {str(path)!r}; the file may hold only the "
            f"tables {sorted(f'[{t}]' for t in _TABLES)}"
        )
    not_tables = sorted(k for k, v in tables.items() if not isinstance(v, dict))
    if not_tables:
        raise ConfigError(f"{not_tables} in {str(path)!r} must be tables, written [name] on their own line")
    return tables


def load_config(path: str | Path | None = None, **train_overrides: Any) -> RunConfig:
    """Defaults, then the TOML file at ``path``, then ``train_overrides`` (``None`` values ignored).

    Unknown tables and unknown keys are errors that name them; so are values of the wrong type.
    """
    tables = _read_tables(path)
    overrides = {k: v for k, v in train_overrides.items() if v is not None}
    tables["train"] = {**tables.get("train", {}), **overrides}
    built = {}
    for name, cls in _TABLES.items():
        values = tables.get(name, {})
        _check_types(cls, name, values)
        built[name] = from_mapping(cls, values, name)
    return RunConfig(**built)
