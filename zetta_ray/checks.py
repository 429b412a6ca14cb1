"""The checks every configuration and shape class shares, each raising ``ConfigError``.

One message shape everywhere: ``"<where>=<value!r> is invalid: <fix>"`` (``where`` names the field as the
user wrote it: ``MoEConfig.d_model``, ``model.hidden``, ``Workload.top_k``). Pure Python, no Ray.
"""

from __future__ import annotations

from typing import Any

from zetta_ray.errors import ConfigError

__all__ = ["check", "is_int", "is_number", "positive_int"]


def is_number(value: Any) -> bool:
    """An int or a float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_int(value: Any) -> bool:
    """An int, not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def check(ok: bool, where: str, value: Any, fix: str) -> None:
    """Raise ``ConfigError("<where>=<value!r> is invalid: <fix>")`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{where}={value!r} is invalid: {fix}")


def positive_int(where: str, value: Any) -> None:
    """``value`` is an integer > 0."""
    check(is_int(value) and value > 0, where, value, "must be a positive integer")
