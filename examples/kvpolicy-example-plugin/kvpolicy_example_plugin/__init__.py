"""An example third-party kvpolicy plugin.

It contributes one scorer, ``value-norm`` (attention weighted by the value norm, as VATP,
arXiv 2406.12335), and one preset, ``vatp``. kvpolicy finds it through the entry point declared in
``pyproject.toml``::

    [project.entry-points.kvpolicy]
    example = "kvpolicy_example_plugin"
"""

from __future__ import annotations

import kvpolicy

from kvpolicy_example_plugin.scorers import ValueNorm

__all__ = ["ValueNorm"]
__version__ = "0.1.0"


@kvpolicy.hookimpl
def kvpolicy_components() -> list[type]:
    """Component classes this plugin registers (their ``kind`` and ``name`` class attributes key them)."""
    return [ValueNorm]


@kvpolicy.hookimpl
def kvpolicy_presets() -> list[kvpolicy.Preset]:
    """Named, complete policies (the same mapping a YAML config file holds)."""
    config = {
        "name": "vatp",
        "description": "VATP: accumulated attention x value L1 norm, 4 sinks, recent quarter of the budget",
        "budget": {"ratio": 0.2, "sink": 4, "recent": 0.25},
        "scorer": {"name": "value-norm", "p": 1},
        "selector": {"name": "topk"},
        "merger": {"name": "none"},
        "decode": {"name": "none"},
        "layers": {"name": "uniform"},
    }
    return [kvpolicy.Preset("vatp", config, config["description"])]
