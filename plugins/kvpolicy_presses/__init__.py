"""Methods from kvpress's list that need no trained artefact: ExpectedAttention, KeyDiff, LagKV, leverage-score (CUR) selection.

Each method is one module of this package, read like its paper; its decisions where the paper is silent
are stated at the top of the module. CriticalKV is left out: it weights scores by ``||W_o v||``, and the
compression context carries no output-projection weights (see ``docs/methods/presses.md``).
"""

from __future__ import annotations

from kvpolicy.hookspecs import hookimpl
from kvpolicy.registry import Preset

from kvpolicy_presses.expected_attention import ExpectedAttention
from kvpolicy_presses.keydiff import KeyDiff
from kvpolicy_presses.lagkv import LagKV
from kvpolicy_presses.leverage import Leverage

_EVICT = {"selector": "topk", "merger": "none", "decode": "none", "layers": "uniform"}


@hookimpl
def kvpolicy_components() -> list[type]:
    return [ExpectedAttention, KeyDiff, LagKV, Leverage]


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
    ]
