"""Adaptive budgets that really shrink the cache: the ``adaptive`` selector and its presets.

* :mod:`kvpolicy_adaptive.allocation` - selector ``adaptive``: ``scope: heads`` spends each layer's budget
  over its KV heads by score (AdaKV, arXiv 2407.11550), ``scope: layers`` over every head of every layer
  (KVzip's global top-k, arXiv 2505.23416), each head with a floor. Heads that keep different counts are
  stored apart, so the bytes held are the entries kept.

Presets: ``adakv-snapkv``, ``adakv-expected-attention``, ``h2o-global``, ``snapkv-global``, ``kvzip``
(reconstruction score pooled over layers, floor 0.5, 10 % recent), ``kvzip-f0.2`` (pooled as kvpress
does: no recent window, floor 0.2; the uniform form is ``kvzip-uniform`` in the structured plugin),
``lookm-pivot-adakv`` (LOOK-M's text prior and pivotal merge with AdaKV allocation).
"""

from __future__ import annotations

from typing import Any

from kvpolicy.hookspecs import hookimpl
from kvpolicy.registry import Preset

from kvpolicy_adaptive.allocation import Adaptive, allocation_key

__all__ = ["Adaptive", "allocation_key"]

KVZIP_SCORER: dict[str, Any] = {"name": "reconstruction", "chunk": 2048, "stride": 1}
HEADS: dict[str, Any] = {"name": "adaptive", "scope": "heads", "floor": 0.2}
LAYERS: dict[str, Any] = {"name": "adaptive", "scope": "layers", "floor": 0.2, "stage_cap": 3.0}


@hookimpl
def kvpolicy_components() -> list[type]:
    return [Adaptive]


#: KVzip's pooled presets are the KVzip method (the adaptive selector is how it pools), not Ada-KV
KVZIP_PAPER = "KVzip, Kim et al. 2025, arXiv:2505.23416"


def _preset(name: str, desc: str, budget: dict, scorer: dict, selector: dict, merger: dict | None = None,
            prior: dict | None = None, paper: str = "") -> Preset:
    cfg: dict[str, Any] = {"name": name, "description": desc, "budget": budget, "scorer": scorer,
                           "selector": selector, "merger": merger or {"name": "none"}, "decode": {"name": "none"},
                           "layers": {"name": "uniform"}}
    if prior is not None:
        cfg["prior"] = prior
    return Preset(name, cfg, desc, paper)


@hookimpl
def kvpolicy_presets() -> list[Preset]:
    snapkv = {"name": "snapkv", "window": 32, "kernel": 7}
    h2o_budget = {"ratio": 0.2, "sink": 4, "recent": 0.5}
    return [
        _preset("adakv-snapkv", "AdaKV(SnapKV): each layer's budget spent over its KV heads by window votes, "
                "floor 0.2 (kvpress's AdaKVPress defaults); heads stored apart",
                {"ratio": 0.2, "sink": 0}, snapkv, HEADS),
        _preset("adakv-expected-attention", "AdaKV allocation over ExpectedAttention scores",
                {"ratio": 0.2, "sink": 4}, {"name": "expected-attention"}, HEADS),
        _preset("snapkv-global", "SnapKV votes pooled over every head of every layer (two stages, cap 3x)",
                {"ratio": 0.2, "sink": 0}, snapkv, LAYERS),
        _preset("h2o-global", "H2O's accumulated attention pooled over every head of every layer "
                "(two stages, cap 3x), 4 sinks and half the budget's share as recent floor per head",
                h2o_budget, {"name": "accumulated-attention"}, LAYERS),
        _preset("kvzip", "KVzip: context-reconstruction score, one top-k over every layer and head, each "
                "head keeping at least half its share; 4 sinks, 10 % recent; heads stored apart",
                {"ratio": 0.2, "sink": 4, "recent": 0.1}, KVZIP_SCORER,
                {"name": "adaptive", "scope": "layers", "floor": 0.5, "stage_cap": "all"}, paper=KVZIP_PAPER),
        _preset("kvzip-f0.2", "KVzip pooled as kvpress does (4 sinks, no recent window), floor 0.2 per head",
                {"ratio": 0.2, "sink": 4, "recent": 0}, KVZIP_SCORER,
                {"name": "adaptive", "scope": "layers", "floor": 0.2, "stage_cap": "all"}, paper=KVZIP_PAPER),
        _preset("lookm-pivot-adakv", "LOOK-M (text prior, pivotal merge) with AdaKV allocation over the heads",
                {"ratio": 0.2, "sink": 0, "recent": 0.5}, {"name": "accumulated-attention"}, HEADS,
                merger={"name": "pivotal"}, prior={"name": "text-prior"}),
    ]
