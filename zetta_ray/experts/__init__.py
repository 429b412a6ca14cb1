"""Pure PyTorch MoE building blocks: router, experts, the single-process MoE layer. No Ray."""

from zetta_ray.experts.ffn import ExpertFFN
from zetta_ray.experts.moe import DispatchPlan, ExpertExecutor, MoELayer, combine, plan_dispatch
from zetta_ray.experts.router import Routing, capacity, load_balancing_loss, route, router_z_loss

__all__ = [
    "DispatchPlan",
    "ExpertExecutor",
    "ExpertFFN",
    "MoELayer",
    "Routing",
    "capacity",
    "combine",
    "load_balancing_loss",
    "plan_dispatch",
    "route",
    "router_z_loss",
]
