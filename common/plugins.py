"""Named extensions declared by installed packages (Python entry points), so a lower package can run what a higher
one provides without importing it: e.g. GenEval scoring (eval/) with the shapes world's exact detector (world/),
declared in pyproject.toml as

    [project.entry-points."vqrae.geneval_detectors"]
    shapes = "world.detector:ShapesDetector"
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any


def plugin_names(group: str) -> list[str]:
    """The names declared under an entry-point group, sorted."""
    return sorted(ep.name for ep in entry_points(group=group))


def load_plugin(group: str, name: str) -> Any:
    """The object declared as `name` in entry-point group `group`; one ValueError listing the known names if none.

    Args:
        group: the entry-point group (e.g. "vqrae.geneval_detectors").
        name: the declared name (e.g. "shapes").
    """
    found = [ep for ep in entry_points(group=group) if ep.name == name]
    if not found:
        known = ", ".join(plugin_names(group)) or "none: is the project installed (pip install -e .)?"
        raise ValueError(f"no {group} plugin named {name!r} (known: {known})")
    return found[0].load()
