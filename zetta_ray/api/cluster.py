"""Joining or starting the Ray cluster that zetta_ray runs on."""

from __future__ import annotations

import os
from typing import Any

import ray

__all__ = ["init"]


def init(address: str | None = None, **ray_init_kwargs: Any) -> None:
    """Connect to Ray: ``address``, else ``RAY_ADDRESS`` when set, else an embedded local cluster.

    Calling it again is harmless: an already connected process keeps its connection. Extra keyword
    arguments go to ``ray.init`` (for example ``num_cpus=8`` or ``include_dashboard=True``). The embedded
    cluster starts without the dashboard unless asked, which saves about two seconds.
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **ray_init_kwargs)
    else:
        ray_init_kwargs.setdefault("include_dashboard", False)
        ray.init(**ray_init_kwargs)
