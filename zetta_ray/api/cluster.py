"""Joining or starting the Ray cluster that zetta_ray runs on."""

from __future__ import annotations

import os
from typing import Any

import ray

from zetta_ray.errors import ConfigError

__all__ = ["init"]


def init(address: str | None = None, *, units: dict[str, int] | None = None, **ray_init_kwargs: Any) -> None:
    """Connect to Ray: ``address``, else ``RAY_ADDRESS`` when set, else an embedded local cluster.

    ``units`` declares the compute units of an embedded cluster by kind, e.g. ``{"npu": 8, "gpu": 2}``:
    each kind becomes a Ray custom resource that slices reserve (``"cpu"`` sets the CPU count). On a real
    cluster, declare them where the nodes start: ``ray start --resources='{"npu": 4}'``.

    Calling it again is harmless: an already connected process keeps its connection. Extra keyword
    arguments go to ``ray.init`` (for example ``num_cpus=8`` or ``include_dashboard=True``). The embedded
    cluster starts without the dashboard unless asked, which saves about two seconds.
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        if units:
            raise ConfigError(
                f"zr.init(units={units!r}) declares units of a new local cluster, but address={address!r} "
                "joins an existing one; declare them with `ray start --resources=...` on its nodes"
            )
        ray.init(address=address, **ray_init_kwargs)
        return
    if units:
        bad = {k: v for k, v in units.items() if not isinstance(v, int) or v < 0}
        if bad:
            raise ConfigError(f"zr.init(units=...) counts must be integers >= 0, got {bad}")
        units = dict(units)
        if "cpu" in units:
            ray_init_kwargs.setdefault("num_cpus", units.pop("cpu"))
        ray_init_kwargs["resources"] = {**ray_init_kwargs.get("resources", {}), **units}
    # address="local" always starts a new cluster; a bare ray.init() would join any cluster that
    # `ray start` left running on this machine.
    ray_init_kwargs.setdefault("include_dashboard", False)
    ray.init(address="local", **ray_init_kwargs)
