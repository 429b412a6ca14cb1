"""Ray actor classes. Actors never import runtime/'s engine or control/."""

from zetta_ray.actors.compute_unit import ComputeUnit, ComputeUnitActor

__all__ = ["ComputeUnit", "ComputeUnitActor"]
