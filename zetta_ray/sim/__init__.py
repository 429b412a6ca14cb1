"""The zettascale simulator: plan a model on a machine nobody here has, and say what it would do.

``simulate(spec)`` takes a spec (TOML path, parsed mapping or ``SimSpec``) and returns a JSON-ready
dict: the mesh (searched when ``parallel = "auto"``), predicted step time, MFU, tokens/s, memory per
unit, bytes per network tier, the gain of per-job optical circuits, the expert placement from
``zetta_ray.placement``, and goodput under failures. ``render(path, as_json=...)`` is the text the
``zetta-ray simulate`` command prints. See ``docs/simulator.md`` for the model and its validation.
"""

from zetta_ray.model_spec import ModelSpec
from zetta_ray.sim.calibration import CALIBRATED, Efficiency
from zetta_ray.sim.hardware import PRESETS, Hardware, TierFigures, UnitFigures, preset
from zetta_ray.sim.parallel import ParallelSpec
from zetta_ray.sim.report import format_report, main_simulate, render
from zetta_ray.sim.simulate import simulate
from zetta_ray.sim.spec import DoesNotFitError, SearchSpec, SimSpec, SpecError, load_spec, parse_spec
from zetta_ray.sim.step import StepReport, step

__all__ = [
    "CALIBRATED",
    "PRESETS",
    "DoesNotFitError",
    "Efficiency",
    "Hardware",
    "ModelSpec",
    "ParallelSpec",
    "SearchSpec",
    "SimSpec",
    "SpecError",
    "StepReport",
    "TierFigures",
    "UnitFigures",
    "format_report",
    "load_spec",
    "main_simulate",
    "parse_spec",
    "preset",
    "render",
    "simulate",
    "step",
]
