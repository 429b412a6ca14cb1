"""Pure PyTorch reference models built from ``zetta_ray.experts``. No Ray."""

from zetta_ray.models.moe_transformer import MoETransformer

__all__ = ["MoETransformer"]
