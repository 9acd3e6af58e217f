"""KVMerger (arXiv 2407.08454) as a kvpolicy plugin.

Steps: selector ``kvmerger`` (protected recent + heavy-hitter entries, merging sets = runs of adjacent
similar keys, pivots) and merger ``kvmerger`` (Gaussian-kernel weighted merge around each pivot); the
scorer is the baselines' ``accumulated-attention``.

Presets: ``kvmerger`` (fixed threshold 0.75, 17 % recent + 12 % heavy hitters protected, nominal budget
0.5: the achieved size is what the threshold gives, reported per layer) and ``kvmerger-exact`` (budget 0.2
met exactly per layer by merging the most similar adjacent pairs; 8 % recent + 2 % heavy hitters, the
paper's 35 % setting, since 29 % protected would not fit 20 %). See :mod:`kvpolicy_kvmerger.kvmerger`.
"""

from __future__ import annotations

from kvpolicy.hookspecs import hookimpl
from kvpolicy.registry import Preset

from kvpolicy_kvmerger.kvmerger import (KVMergerGaussian, KVMergerSets, MergeSets, adjacent_cosine, exact_joins,
                                        gaussian_merge, merging_sets, protected_entries)

__all__ = ["KVMergerGaussian", "KVMergerSets", "MergeSets", "adjacent_cosine", "exact_joins", "gaussian_merge",
           "merging_sets", "protected_entries"]


@hookimpl
def kvpolicy_components() -> list[type]:
    return [KVMergerSets, KVMergerGaussian]


def _config(name: str, desc: str, ratio: float, selector: dict) -> dict:
    return {
        "name": name,
        "description": desc,
        "budget": {"ratio": ratio, "sink": 0},
        "scorer": {"name": "accumulated-attention"},
        "selector": {"name": "kvmerger", "similarity": 0.75, **selector},
        "merger": {"name": "kvmerger", "sigma": 5.0, "sigma_mode": "constant", "mass": "scaled"},
        "decode": {"name": "none"},
        "layers": {"name": "uniform"},
    }


@hookimpl
def kvpolicy_presets() -> list[Preset]:
    fixed = "KVMerger: adjacent keys with cosine > 0.75 merged around their most-attended token (size reported)"
    exact = "KVMerger with an exact per-layer budget: the most similar adjacent pairs merged until it fits"
    return [
        Preset("kvmerger", _config("kvmerger", fixed, 0.5, {"recent": 0.17, "heavy": 0.12, "mode": "fixed"}), fixed),
        Preset("kvmerger-exact", _config("kvmerger-exact", exact, 0.2,
                                         {"recent": 0.08, "heavy": 0.02, "mode": "exact"}), exact),
    ]
