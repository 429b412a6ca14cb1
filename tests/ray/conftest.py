"""One local Ray cluster per test module (ray.init costs ~4 s; actors that import torch ~1 s each)."""

from __future__ import annotations

import pytest
import ray

import zetta_ray as zr


@pytest.fixture(scope="module")
def ray_cluster():
    if ray.is_initialized():
        ray.shutdown()
    zr.init(num_cpus=2)
    yield
    ray.shutdown()
