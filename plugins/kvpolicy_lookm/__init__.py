"""LOOK-M (arXiv 2406.18139) as a kvpolicy plugin: text prior, ``lookm-topk`` selection, A/P/W merges.

Presets (default budget 20 %: ``a1 = a2 = 0.1``, i.e. ratio 0.2 with the recent window half of it):

* ``lookm-avg``, ``lookm-pivot`` (the paper's best, "TP + P-Merge"), ``lookm-weighted``: text prior +
  merge, no sinks;
* ``text-prior-h2o``: text prior, evicted entries dropped;
* ``lookm-avg-notp``, ``lookm-pivot-notp``, ``lookm-weighted-notp``: plain top-k + merge with the first
  4 positions forced (as the released code's non-text-prior merge modes).

See :mod:`kvpolicy_lookm.lookm` for the algorithm and the decisions taken.
"""

from __future__ import annotations

from kvpolicy.hookspecs import hookimpl
from kvpolicy.registry import Preset, estimated

from kvpolicy_lookm.lookm import (Averaged, LookMTopK, MergeResult, Pivotal, TextPrior, Weighted, lookm_budget,
                                  lookm_merge, merge_rule, similarity_filter)

__all__ = ["Averaged", "LookMTopK", "MergeResult", "Pivotal", "TextPrior", "Weighted", "lookm_budget",
           "lookm_merge", "merge_rule", "similarity_filter"]

_RULES = {"avg": "averaged", "pivot": "pivotal", "weighted": "weighted"}


@hookimpl
def kvpolicy_components() -> list[type]:
    return [TextPrior, LookMTopK, Averaged, Pivotal, Weighted]


def _preset(name: str, desc: str, merger: str, text_prior: bool) -> Preset:
    cfg = {
        "name": name,
        "description": desc,
        "budget": lookm_budget(0.1, 0.1, sink=0 if text_prior else 4),
        "scorer": {"name": "accumulated-attention"},
        "selector": {"name": "lookm-topk"},
        "merger": {"name": merger},
        "decode": {"name": "none"},
        "layers": {"name": "uniform"},
    }
    if text_prior:
        cfg["prior"] = {"name": "text-prior"}
    return Preset(name, cfg, desc)


@hookimpl
def kvpolicy_presets() -> list[Preset]:
    out = [_preset("text-prior-h2o", "LOOK-M text-prior H2O: text kept first, no merge", "none", True)]
    for short, rule in _RULES.items():
        out.append(_preset(f"lookm-{short}", f"LOOK-M: text prior + {rule} merge of evicted KV", rule, True))
        out.append(estimated(out[-1]))
        out.append(_preset(f"lookm-{short}-notp", f"LOOK-M {rule} merge without text prior, 4 sinks forced",
                           rule, False))
    return out
