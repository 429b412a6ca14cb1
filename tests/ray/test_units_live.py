"""zr.init(units=...) declares unit kinds on a laptop; slices reserve them and spares are real bundles."""

from __future__ import annotations

import time

import pytest
import ray
import torch
from ray.util.placement_group import placement_group_table

import zetta_ray as zr

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def npu_laptop(start_ray):
    start_ray(units={"npu": 4, "gpu": 1, "cpu": 2})


def test_declared_units_are_cluster_resources_and_slices_use_them(npu_laptop):
    resources = ray.cluster_resources()
    assert resources["npu"] == 4 and resources["gpu"] == 1 and resources["CPU"] == 2
    cfg = zr.MoEConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, n_experts=4, d_ff=32, seq_len=8)
    model = zr.MoETransformer(cfg)
    with zr.parallelize(model, zr.ExpertParallel(degree=2), slice=zr.SliceRequest(units=2, spares=2)) as dm:
        assert dm.slice.plan.kind == "npu"  # npu is preferred for experts
        bundles = placement_group_table()[dm.slice.pg.id.hex()]["bundles"]
        assert len(bundles) == 4 and all(b == {"npu": 1.0} for b in bundles.values())  # 2 units + 2 spares
        assert ray.available_resources().get("npu", 0) == 0  # the spares are held, not just promised
        x = torch.randint(0, 32, (2, 8))
        _, loss = dm(x, x)
        loss.backward()
    deadline = time.monotonic() + 20  # placement-group removal is asynchronous: wait for the condition
    while ray.available_resources().get("npu") != 4:
        assert time.monotonic() < deadline, ray.available_resources()
        time.sleep(0.1)


def test_units_cannot_be_declared_when_joining_a_cluster(npu_laptop):
    ray.shutdown()  # the last test of the module: zr.init only checks when not yet connected
    with pytest.raises(zr.errors.ConfigError, match="ray start --resources"):
        zr.init("127.0.0.1:1", units={"npu": 1})  # refused before any connection is tried
