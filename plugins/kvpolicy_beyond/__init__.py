"""Beyond the papers: merges that keep what eviction loses, and scores that anticipate future queries.

Components (all composable with every selector):

* mergers ``mass`` (:class:`MassMerge`: value-only or key+value fold, attention / count / score /
  similarity weights, ``log n`` or attention-mass logit bias, cosine threshold and per-head quantile
  threshold) and ``mass-pivotal`` (LOOK-M's P-Merge + ``log n`` bias and multiplicity tracking);
* scorers ``reconstruction`` (KVzip-style context reconstruction, deferred prefill) and
  ``max-attention`` (its free proxy).

Presets (budget ratio 0.2 by default): ``h2o-mass``, ``h2o-mass-stride8``, ``h2o-mass-keys``,
``lookm-pivot-mass``, ``lookm-pivot-mass-vonly``, ``kvzip-lite``, ``kvzip-full``, ``kvzip-lite-mass``.
See ``docs/methods/beyond.md`` for the figures.
"""

from __future__ import annotations

from kvpolicy.hookspecs import hookimpl
from kvpolicy.registry import Preset, estimated

from kvpolicy_beyond.merge import MassMerge, MassPivotal, fold, merge_filter
from kvpolicy_beyond.score import DEFAULT_PROMPT, MaxAttention, Reconstruction

__all__ = ["DEFAULT_PROMPT", "MassMerge", "MassPivotal", "MaxAttention", "Reconstruction", "fold", "merge_filter"]

H2O_BUDGET = {"ratio": 0.2, "sink": 4, "recent": 0.5}
KVZIP_BUDGET = {"ratio": 0.2, "sink": 4, "recent": 0.1}


@hookimpl
def kvpolicy_components() -> list[type]:
    return [MassMerge, MassPivotal, Reconstruction, MaxAttention]


def _preset(name: str, desc: str, scorer: dict, merger: dict, budget: dict) -> Preset:
    cfg = {"name": name, "description": desc, "budget": budget, "scorer": scorer, "selector": {"name": "topk"},
           "merger": merger, "decode": {"name": "none"}, "layers": {"name": "uniform"}}
    return Preset(name, cfg, desc)


@hookimpl
def kvpolicy_presets() -> list[Preset]:
    h2o = {"name": "accumulated-attention"}
    lite = {"name": "reconstruction", "chunk": 512, "stride": 2}
    mass = {"name": "mass", "keys": "keep", "weights": "attention", "mass": "count"}
    presets = [
        _preset("h2o-mass", "H2O selection + value-only mass-preserving merge (attention weights, +log n)",
                h2o, mass, H2O_BUDGET),
        _preset("h2o-mass-stride8", "h2o-mass with H2O's score (and the merge weights) from every 8th prefill query",
                {**h2o, "query_stride": 8}, mass, H2O_BUDGET),
        _preset("h2o-mass-keys", "H2O selection + key/value mass-preserving merge (attention weights, +log n)",
                h2o, {**mass, "keys": "mean"}, H2O_BUDGET),
        _preset("lookm-pivot-mass", "LOOK-M pivotal merge (no text prior, 4 sinks) with +log n mass preservation",
                h2o, {"name": "mass-pivotal"}, {"ratio": 0.2, "sink": 4, "recent": 0.5}),
        _preset("lookm-pivot-mass-vonly", "LOOK-M pivotal rule on values only (survivors keep their keys), +log n",
                h2o, {"name": "mass-pivotal", "keys": "keep"}, H2O_BUDGET),
        _preset("kvzip-full", "KVzip-style context reconstruction score (every chunk re-read), eviction",
                {"name": "reconstruction", "chunk": 512}, {"name": "none"}, KVZIP_BUDGET),
        _preset("kvzip-lite", "context reconstruction of every other 512-token chunk (half the extra cost)",
                lite, {"name": "none"}, KVZIP_BUDGET),
        _preset("kvzip-lite-mass", "kvzip-lite selection + value-only mass-preserving merge (score weights)",
                lite, {**mass, "weights": "score"}, KVZIP_BUDGET),
    ]
    return presets + [estimated(x) for x in presets if x.name == "h2o-mass"]
