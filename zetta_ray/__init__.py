"""zetta_ray: a Ray actor runtime for training Mixture-of-Experts models.

import zetta_ray as zr

model = zr.MoETransformer(zr.MoEConfig(n_experts=8))
with zr.mesh(expert=4):
    dmodel = zr.parallelize(model, zr.ExpertParallel(degree=4))
opt = dmodel.optimizer(torch.optim.AdamW, lr=3e-3)
for x, y in batches:
    opt.zero_grad()
    logits, loss = dmodel(x, y)
    loss.backward()
    opt.step()
"""

from zetta_ray import chaos, data, errors
from zetta_ray.api import (
    DataParallel,
    DataParallelModule,
    DistributedModule,
    DistributedOptimizer,
    ExpertParallel,
    Mesh,
    PipelineModule,
    PipelineParallel,
    UnitRecord,
    current_mesh,
    init,
    mesh,
    parallelize,
)
from zetta_ray.checkpoint import TrickleCheckpoint
from zetta_ray.config import MoEConfig, RuntimeConfig, TrainConfig
from zetta_ray.experts import ExpertFFN, MoELayer
from zetta_ray.models import MoETransformer
from zetta_ray.placement.plan import PlacerConfig
from zetta_ray.placement.slice_plan import SliceRequest

__version__ = "0.1.0"

__all__ = [
    "chaos",
    "DataParallel",
    "DataParallelModule",
    "DistributedModule",
    "DistributedOptimizer",
    "PipelineModule",
    "ExpertFFN",
    "ExpertParallel",
    "Mesh",
    "MoEConfig",
    "MoELayer",
    "MoETransformer",
    "PipelineParallel",
    "PlacerConfig",
    "RuntimeConfig",
    "SliceRequest",
    "TrainConfig",
    "TrickleCheckpoint",
    "UnitRecord",
    "current_mesh",
    "data",
    "errors",
    "init",
    "mesh",
    "parallelize",
]
