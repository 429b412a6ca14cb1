"""tests/unit starts no Ray cluster: each test is checked (``pytest -m "not ray"`` relies on it)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import ray


@pytest.fixture(autouse=True)
def no_ray_cluster(request: pytest.FixtureRequest) -> Iterator[None]:
    connected = ray.is_initialized()  # left by a module of another directory: not this test's doing
    yield
    if not connected and ray.is_initialized():
        ray.shutdown()
        pytest.fail(f"{request.node.nodeid} started a Ray cluster; tests that need one live in tests/ray")
