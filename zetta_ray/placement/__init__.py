"""Placement: the machine (topology), what a step costs on it (cost model), and where everything goes."""

from zetta_ray.placement.topology import Link, LinkTiers, Tier, Topology

__all__ = ["Link", "LinkTiers", "Tier", "Topology"]
