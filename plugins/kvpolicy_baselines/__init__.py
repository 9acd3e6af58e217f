"""kvpolicy's built-in eviction baselines and generic steps, registered as a plugin.

StreamingLLM, H2O, SnapKV, TOVA, key-norm, random, PyramidKV budgets, plus the steps every policy
composes (top-k selection, no merge, decode rules, layer schedules).
"""

from __future__ import annotations

from kvpolicy.hookspecs import hookimpl
from kvpolicy.registry import Preset, estimated

from kvpolicy_baselines.scorers import TOVA, AccumulatedAttention, KeyNorm, RandomScore, Recency, SnapKV
from kvpolicy_baselines.steps import KeepAll, NoDecode, NoMerge, Pyramid, Rolling, TopK, Uniform

_EVICT = {"selector": "topk", "merger": "none", "decode": "none", "layers": "uniform"}


@hookimpl
def kvpolicy_components() -> list[type]:
    return [AccumulatedAttention, SnapKV, TOVA, KeyNorm, Recency, RandomScore,
            TopK, KeepAll, NoMerge, NoDecode, Rolling, Uniform, Pyramid]


@hookimpl
def kvpolicy_presets() -> list[Preset]:
    def p(name: str, desc: str, scorer: dict, budget: dict, **steps: object) -> Preset:
        return Preset(name, {"name": name, "description": desc, "budget": budget, "scorer": scorer,
                             **_EVICT, **steps}, desc)

    presets = [
        p("full", "no compression (reference)", {"name": "streaming"}, {"ratio": 1.0, "sink": 0},
          selector="all"),
        p("streaming", "StreamingLLM: 4 sink tokens + the most recent ones", {"name": "streaming"},
          {"ratio": 0.2, "sink": 4}),
        p("h2o", "H2O: accumulated attention, recent half of the budget, 4 sinks",
          {"name": "accumulated-attention"}, {"ratio": 0.2, "sink": 4, "recent": 0.5}),
        p("snapkv", "SnapKV: last-32-query votes, avg-pooled (kernel 7), window kept",
          {"name": "snapkv", "window": 32, "kernel": 7}, {"ratio": 0.2, "sink": 0}),
        p("tova", "TOVA: last-query attention averaged over heads, last token kept", {"name": "tova"},
          {"ratio": 0.2, "sink": 0, "recent": 1}),
        p("knorm", "KnormPress: smallest key norms", {"name": "knorm"}, {"ratio": 0.2, "sink": 0}),
        p("random", "random eviction (seeded), 4 sinks", {"name": "random"}, {"ratio": 0.2, "sink": 4}),
        p("pyramidkv", "PyramidKV: SnapKV selection with budgets decreasing over layers",
          {"name": "snapkv", "window": 32, "kernel": 7}, {"ratio": 0.2, "sink": 0},
          layers={"name": "pyramid", "beta": 20, "window": 32}),
        p("h2o-stride8", "H2O with its score estimated from every 8th prefill query (1/8 of the scoring cost)",
          {"name": "accumulated-attention", "query_stride": 8}, {"ratio": 0.2, "sink": 4, "recent": 0.5}),
        p("h2o-rolling", "H2O with a rolling decode budget (compacts every 16 tokens)",
          {"name": "accumulated-attention"}, {"ratio": 0.2, "sink": 4, "recent": 0.5},
          decode={"name": "rolling", "every": 16}),
    ]
    return presets + [estimated(x) for x in presets if x.name == "h2o"]
