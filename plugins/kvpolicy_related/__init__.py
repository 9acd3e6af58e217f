"""The seed methods' related work: D2O, CORM, CaM, Cascading KV cache, VL-Cache.

Each method is one module of this package, read like its paper; its decisions where the paper is silent
are stated at the top of the module.

* :mod:`kvpolicy_related.corm` - CORM (arXiv 2404.15949): scorer ``corm`` (max over the last ``w``
  queries of the attention relative to the uniform share), selector ``corm-threshold`` (the paper's
  budget-free test, capped at the budget). Presets ``corm``, ``corm-threshold``.
* :mod:`kvpolicy_related.cam` - CaM (ICML 2024): merger ``cam`` (evicted values merged into the next
  ``m`` kept ones with probability their attention share). Preset ``h2o-cam``.
* :mod:`kvpolicy_related.d2o` - D2O (arXiv 2406.13035): schedule ``d2o-density`` (layer budgets from
  calibrated attention densities), merger ``d2o`` (EMA-threshold cosine recall and merge). Presets
  ``d2o`` (uniform layers) and ``d2o-smollm2`` (SmolLM2's calibrated densities).

* :mod:`kvpolicy_related.cascading` - Cascading KV cache (arXiv 2406.17808): scorer ``cascade-ema`` (EMA of
  the attention), selector ``cascading`` (sinks + sub-caches, cascade i open every k^i steps), decode rule
  ``cascading`` (one compaction per generated token). Preset ``cascading``.
* :mod:`kvpolicy_related.vlcache` - VL-Cache (arXiv 2410.23317): scorer ``post-vision`` (attention of the
  queries after the last visual token), selector ``vlcache-sparsity`` (keeps fewer than the layer budget in
  proportion to the layer's measured post-vision density). Preset ``vlcache``.

MixAttention is not implemented: it changes the architecture and needs training (see
``docs/methods/related.md``). Default budget: ratio 0.2.
"""

from __future__ import annotations

from kvpolicy.hookspecs import hookimpl
from kvpolicy.registry import Preset

from kvpolicy_related.cam import CaM
from kvpolicy_related.cascading import Cascading, CascadingDecode, CascadeEMA
from kvpolicy_related.corm import CORM, CORMThreshold
from kvpolicy_related.vlcache import PostVision, VLCacheSparsity
from kvpolicy_related.d2o import SMOLLM2_DENSITY, D2OMerge, DensitySchedule, calibrate_density

__all__ = ["CORM", "CORMThreshold", "CaM", "CascadeEMA", "Cascading", "CascadingDecode", "D2OMerge", "DensitySchedule",
           "PostVision", "SMOLLM2_DENSITY", "VLCacheSparsity", "calibrate_density"]

H2O_BUDGET = {"ratio": 0.2, "sink": 4, "recent": 0.5}


@hookimpl
def kvpolicy_components() -> list[type]:
    return [CORM, CORMThreshold, CaM, D2OMerge, DensitySchedule, CascadeEMA, Cascading, CascadingDecode, PostVision,
            VLCacheSparsity]


def _preset(name: str, desc: str, budget: dict, scorer: dict, selector: dict | None = None,
            merger: dict | None = None, layers: dict | None = None, decode: dict | None = None) -> Preset:
    cfg = {"name": name, "description": desc, "budget": budget, "scorer": scorer,
           "selector": selector or {"name": "topk"}, "merger": merger or {"name": "none"},
           "decode": decode or {"name": "none"}, "layers": layers or {"name": "uniform"}}
    return Preset(name, cfg, desc)


@hookimpl
def kvpolicy_presets() -> list[Preset]:
    return [
        _preset("corm", "CORM (budgeted): max relative attention from the last 32 queries, window kept, 4 sinks",
                {"ratio": 0.2, "sink": 4}, {"name": "corm", "window": 32}),
        _preset("corm-threshold", "CORM's budget-free test (relative attention >= 1), capped at the budget",
                {"ratio": 0.2, "sink": 4}, {"name": "corm", "window": 32},
                selector={"name": "corm-threshold", "lam": 1.0}),
        _preset("h2o-cam", "CaM: H2O selection, evicted values merged into the next 4 kept ones (Bernoulli)",
                H2O_BUDGET, {"name": "accumulated-attention"},
                merger={"name": "cam", "merge_window": 4, "sample": True, "seed": 0}),
        _preset("d2o", "D2O token level: H2O selection + EMA-threshold cosine merge (uniform layer budgets)",
                H2O_BUDGET, {"name": "accumulated-attention"}, merger={"name": "d2o", "beta": 0.9}),
        _preset("d2o-smollm2", "D2O: layer budgets from SmolLM2's calibrated attention densities + D2O merge",
                H2O_BUDGET, {"name": "accumulated-attention"}, merger={"name": "d2o", "beta": 0.9},
                layers={"name": "d2o-density", "shares": SMOLLM2_DENSITY, "min_share": 0.25}),
        _preset("cascading", "Cascading KV cache: 4 sinks + 4 sub-caches, cascade i accepts every 2^i-th token, "
                "EMA attention (beta 0.999) decides; one compaction per generated token",
                {"ratio": 0.2, "sink": 4}, {"name": "cascade-ema", "beta": 0.999},
                selector={"name": "cascading", "cascades": 4, "accept_every": 2},
                decode={"name": "cascading", "query_window": 1}),
        _preset("vlcache", "VL-Cache: post-vision attention scores; each layer keeps min(budget, density x n) "
                "entries, density = share of post-vision attention >= 1 % of its row max",
                {"ratio": 0.2, "sink": 4}, {"name": "post-vision"},
                selector={"name": "vlcache-sparsity", "threshold": 0.01}),
    ]
