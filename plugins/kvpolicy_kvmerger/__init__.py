"""KVMerger (arXiv 2407.08454) as a kvpolicy plugin.

Steps: selector ``kvmerger`` (protected recent + heavy-hitter entries, merging sets = runs of adjacent
similar keys, pivots) and merger ``kvmerger`` (Gaussian-kernel weighted merge around each pivot); the
scorer is the baselines' ``accumulated-attention``.

Presets (issue 12 measured the value rules: the paper's ``|S|``-scaled values collapse once the budget
makes sets large, the weighted mean with a ``+log |S|`` logit bias holds, so the main presets use it):

* ``kvmerger``: threshold 0.75, 17 % recent + 12 % heavy hitters protected, nominal budget 0.5, mode
  ``capped`` (the threshold decides the size where it fits the budget, more similar pairs are merged
  where it does not), ``mass: bias``;
* ``kvmerger-paper``: the literal paper, mode ``fixed`` (the threshold decides the size whatever the
  budget, with a warning when that exceeds it) and ``|S|``-scaled values;
* ``kvmerger-exact``: budget 0.2 met exactly per layer by merging the most similar adjacent pairs, 8 %
  recent + 2 % heavy hitters (the paper's 35 % setting), ``mass: bias``;
* ``kvmerger-exact-paper``: ``kvmerger-exact`` with the paper's ``|S|``-scaled values.

In both budget modes the protected shares shrink where they would not leave room for the merging sets.
See :mod:`kvpolicy_kvmerger.kvmerger`.
"""

from __future__ import annotations

from kvpolicy.hookspecs import hookimpl
from kvpolicy.registry import Preset, estimated

from kvpolicy_kvmerger.kvmerger import (KVMergerGaussian, KVMergerSets, MergeSets, adjacent_cosine, exact_joins,
                                        gaussian_merge, merging_sets, protected_entries)

__all__ = ["KVMergerGaussian", "KVMergerSets", "MergeSets", "adjacent_cosine", "exact_joins", "gaussian_merge",
           "merging_sets", "protected_entries"]


@hookimpl
def kvpolicy_components() -> list[type]:
    return [KVMergerSets, KVMergerGaussian]


def _config(name: str, desc: str, ratio: float, selector: dict, mass: str = "scaled") -> dict:
    return {
        "name": name,
        "description": desc,
        "budget": {"ratio": ratio, "sink": 0},
        "scorer": {"name": "accumulated-attention"},
        "selector": {"name": "kvmerger", "similarity": 0.75, **selector},
        "merger": {"name": "kvmerger", "sigma": 5.0, "sigma_mode": "constant", "mass": mass},
        "decode": {"name": "none"},
        "layers": {"name": "uniform"},
    }


@hookimpl
def kvpolicy_presets() -> list[Preset]:
    capped = ("KVMerger: adjacent keys with cosine > 0.75 merged around their most-attended token (more similar "
              "pairs where that exceeds the budget), weighted-mean values with a +log|S| logit bias")
    fixed = ("KVMerger as the paper: cosine threshold 0.75 decides the size (a warning when above the budget), "
             "|S|-scaled merged values")
    exact = ("KVMerger with an exact per-layer budget: the most similar adjacent pairs merged until it fits, "
             "weighted-mean values with a +log|S| logit bias")
    paper = "kvmerger-exact with the paper's |S|-scaled merged values"
    shares = {"recent": 0.17, "heavy": 0.12}
    exact_sel = {"recent": 0.08, "heavy": 0.02, "mode": "exact"}
    presets = [
        Preset("kvmerger", _config("kvmerger", capped, 0.5, {**shares, "mode": "capped"}, mass="bias"), capped),
        Preset("kvmerger-paper", _config("kvmerger-paper", fixed, 0.5, {**shares, "mode": "fixed"}), fixed),
        Preset("kvmerger-exact", _config("kvmerger-exact", exact, 0.2, exact_sel, mass="bias"), exact),
        Preset("kvmerger-exact-paper", _config("kvmerger-exact-paper", paper, 0.2, exact_sel), paper),
    ]
    return presets + [estimated(x) for x in presets if x.name in ("kvmerger", "kvmerger-exact")]
