"""Placement: the machine (``Topology``), what a step costs on it (``Workload``, ``step_cost``), and where
everything goes (``place``, with ``round_robin`` and ``random_placement`` as baselines).

The planning is pure numpy: the live cluster (``Topology.from_ray_nodes(ray.nodes())``, whose entries
``ray_nodes.py`` reads as plain dicts) and the zettascale simulator plan with the same classes. One
file imports Ray, and this ``__init__`` does not import it: ``slices.py``, the slice scheduler, which
turns a slice plan (``slice_plan.py``, pure) into one Ray placement group. ``report.py`` renders a
plan as the ``zetta-ray plan`` report. See docs/placement.md for the model.
"""

from zetta_ray.placement.baselines import random_placement, round_robin
from zetta_ray.placement.cost import EdgeTable, StepCost, Workload, step_cost, zipf_load
from zetta_ray.placement.placer import place
from zetta_ray.placement.plan import (
    InfeasiblePlacementError,
    Placement,
    PlacementError,
    PlacerConfig,
    check_placement,
)
from zetta_ray.placement.topology import Link, LinkTiers, Tier, Topology

__all__ = [
    "EdgeTable",
    "InfeasiblePlacementError",
    "Link",
    "LinkTiers",
    "Placement",
    "PlacementError",
    "PlacerConfig",
    "StepCost",
    "Tier",
    "Topology",
    "Workload",
    "check_placement",
    "place",
    "random_placement",
    "round_robin",
    "step_cost",
    "zipf_load",
]
