"""The asynchronous dataflow runtime: ObjectRefs, deadlines, the autograd bridge."""

from zetta_ray.runtime.bridge import RemoteExperts
from zetta_ray.runtime.engine import Call, ExpertRuntime, Layout, Ticket

__all__ = ["Call", "ExpertRuntime", "Layout", "RemoteExperts", "Ticket"]
