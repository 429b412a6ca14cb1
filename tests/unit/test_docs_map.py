"""docs/architecture.md stays true: every package is on the map, every path it names exists, and what it
says touches Ray is what imports Ray."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
MAP = ROOT / "docs" / "architecture.md"
PACKAGE = ROOT / "zetta_ray"


def _imports_ray(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "ray" for a in node.names):
            return True
        if (
            isinstance(node, ast.ImportFrom)
            and node.level == 0
            and (node.module or "").split(".")[0] == "ray"
        ):
            return True
    return False


def _package_rows() -> dict[str, list[str]]:
    """The rows of the Packages table: entry (``zetta_ray/x/`` or ``zetta_ray/x.py``) -> its cells."""
    text = MAP.read_text()
    table = text.split("## Packages", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        match = re.fullmatch(r"`(zetta_ray/[\w/.]+)`", cells[0]) if cells else None
        if match:
            rows[match.group(1)] = cells
    return rows


def _entries() -> list[str]:
    """Every package and top-level module of zetta_ray, as the map names them."""
    out = [f"zetta_ray/{p.name}/" for p in PACKAGE.iterdir() if (p / "__init__.py").exists()]
    out += [f"zetta_ray/{p.name}" for p in PACKAGE.glob("*.py") if p.name != "__init__.py"]
    return sorted(out)


def test_every_package_and_top_level_module_is_on_the_map():
    missing = sorted(set(_entries()) - set(_package_rows()))
    assert not missing, f"docs/architecture.md's Packages table lacks {missing}: add a row for each"


def test_every_path_the_map_names_exists():
    named = set(re.findall(r"`([\w.]+/[\w./]*(?:\.py|\.md|/))`", MAP.read_text()))
    assert len(named) > 20  # the page names the packages and the modules of each step
    gone = sorted(p for p in named if not (ROOT / p).exists() and not (PACKAGE / p).exists())
    assert not gone, f"docs/architecture.md names paths that do not exist: {gone}"


def _section(text: str, heading: str) -> str:
    return text.split(f"## {heading}", 1)[1].split("\n## ", 1)[0] if f"## {heading}" in text else ""


def test_the_ray_column_says_what_imports_ray():
    text = MAP.read_text()
    wrong = []
    for entry, cells in _package_rows().items():
        is_package = entry.endswith("/")
        files = sorted((ROOT / entry).rglob("*.py")) if is_package else [ROOT / entry]
        ray_files = [f.name for f in files if _imports_ray(f)]
        says, why = cells[2], cells[3]
        if says not in ("yes", "no"):
            wrong.append(f"{entry}: Ray column {says!r} is neither yes nor no")
        elif (says == "yes") != bool(ray_files):
            wrong.append(f"{entry}: says Ray {says!r}; the files that import ray: {ray_files}")
        if not is_package:
            continue
        # a Ray-facing file is named in its row (or, for control/, in the control plane section)
        named = why + (_section(text, "The control plane") if entry == "zetta_ray/control/" else "")
        wrong += [
            f"{entry}: {n} imports ray and the map does not name it" for n in ray_files if n not in named
        ]
        wrong += [
            f"{entry}: names {n}, which it does not have"
            for n in re.findall(r"`(\w+\.py)`", why)
            if not (ROOT / entry / n).exists()
        ]
    assert not wrong, "docs/architecture.md is out of date:\n" + "\n".join(wrong)
