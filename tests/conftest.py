"""One local Ray cluster per test module (ray.init costs ~4 s; actors that import torch ~1 s each)."""

from __future__ import annotations

import os

import pytest
import ray

import zetta_ray as zr


@pytest.fixture(scope="module")
def ray_cluster():
    if ray.is_initialized():
        ray.shutdown()
    # ray.init() exports RAY_ADDRESS for the driver; after the previous module's shutdown it names a
    # cluster that is gone, and zr.init would try to join it. Each module starts its own.
    os.environ.pop("RAY_ADDRESS", None)
    zr.init(num_cpus=2)
    yield
    ray.shutdown()
