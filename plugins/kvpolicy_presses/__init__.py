"""Methods from kvpress's list: ExpectedAttention, KeyDiff, LagKV, leverage-score (CUR) selection, CriticalKV, Q-Filters.

Each method is one module of this package, read like its paper; its decisions where the paper is silent
are stated at the top of the module. CriticalKV reads the model's output projections from a file written
by :func:`kvpolicy_presses.criticalkv.save_out_proj` (``criticalkv-vnorm``: its weight-free variant); Q-Filters
read per-model filters calibrated by :func:`kvpolicy_presses.qfilter.calibrate_qfilters` (packaged for SmolLM2).
Both are written by ``python -m kvpolicy_presses.calibrate``. DuoAttention needs trained per-head gates and
is left out (see ``docs/methods/presses.md``).
"""

from __future__ import annotations

from kvpolicy.hookspecs import hookimpl
from kvpolicy.registry import Preset

from kvpolicy_presses.expected_attention import ExpectedAttention
from kvpolicy_presses.keydiff import KeyDiff
from kvpolicy_presses.lagkv import LagKV
from kvpolicy_presses.leverage import Leverage
from kvpolicy_presses.criticalkv import CriticalKV
from kvpolicy_presses.qfilter import QFilter
from kvpolicy_presses.think import ThinK

_EVICT = {"selector": "topk", "merger": "none", "decode": "none", "layers": "uniform"}


@hookimpl
def kvpolicy_components() -> list[type]:
    return [ExpectedAttention, KeyDiff, LagKV, Leverage, CriticalKV, QFilter, ThinK]


@hookimpl
def kvpolicy_presets() -> list[Preset]:
    def p(name: str, desc: str, scorer: dict, budget: dict) -> Preset:
        return Preset(name, {"name": name, "description": desc, "budget": budget, "scorer": scorer, **_EVICT}, desc)

    return [
        p("expected-attention",
          "ExpectedAttention: attention expected from future queries (Gaussian fit, RoPE averaged over 512 "
          "positions) times ||v||, 4 sinks; rope_theta 100000 is SmolLM2's",
          {"name": "expected-attention", "n_future_positions": 512, "n_sink": 4, "use_covariance": True,
           "use_vnorm": True, "rope_theta": 100000.0},
          {"ratio": 0.2, "sink": 4}),
        p("keydiff", "KeyDiff: keys least similar to the mean normalised key", {"name": "keydiff"},
          {"ratio": 0.2, "sink": 0}),
        p("lagkv", "LagKV: lag-relative std of keys and values, 128-token chunks, sinks and last chunk kept",
          {"name": "lagkv", "n_sink": 4, "lag_size": 128}, {"ratio": 0.2, "sink": 4}),
        p("leverage", "Leverage scores of the centred pre-RoPE keys (exact thin SVD)",
          {"name": "leverage", "source": "key", "center": True, "pre_rope": True, "rope_theta": 100000.0},
          {"ratio": 0.2, "sink": 0}),
        p("leverage-kv", "CurDKV-style: product of key and value leverage scores, 4 sinks",
          {"name": "leverage", "source": "kv_product", "center": True, "pre_rope": True, "rope_theta": 100000.0},
          {"ratio": 0.2, "sink": 4}),
        p("criticalkv-vnorm",
          "CriticalKV's two stages on SnapKV (half the budget by SnapKV, the rest by score x ||v||_1): the "
          "weight-free variant (W_o = I); out_proj: PATH gives exact CriticalKV",
          {"name": "criticalkv", "base": {"name": "snapkv"}, "first_stage_ratio": 0.5, "epsilon": 1e-4,
           "out_proj": None},
          {"ratio": 0.2, "sink": 4}),
        p("qfilter-smollm2",
          "Q-Filters: key projection on the principal query direction, SmolLM2's packaged filters (other "
          "models: the prompt's own queries)",
          {"name": "qfilter", "filters": "smollm2", "fallback": "prompt"},
          {"ratio": 0.2, "sink": 4}),
        *_think_presets(),
    ]


def _think_presets() -> list[Preset]:
    """ThinK alone (every token kept, half of each KV head's key channels dropped) and on SnapKV's selection."""
    def t(name: str, desc: str, budget: dict) -> Preset:
        cfg = {"name": name, "description": desc, "budget": budget, "scorer": {"name": "snapkv", "window": 32},
               "selector": "topk", "merger": {"name": "think", "pruned": 0.5, "window": 32}, "decode": "none",
               "layers": "uniform"}
        return Preset(name, cfg, desc)

    return [t("think", "ThinK: every token kept, the half of each KV head's key channels that the last 32 "
                       "queries use least dropped from memory (keys 0.5, KV bytes 0.75)", {"ratio": 1.0, "sink": 0}),
            t("think-snapkv", "SnapKV's token selection, then ThinK drops half of the kept keys' channels "
                              "(KV bytes 0.75 x the budget)", {"ratio": 0.2, "sink": 4})]
