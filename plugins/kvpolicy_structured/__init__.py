"""Chunk-, layer- and question-structured selection: ChunkKV, SimLayerKV, Finch; KVzip as a first-class preset.

Each method is one module of this package, read like its paper; its decisions where the paper is silent
are stated at the top of the module.

Components: selectors ``chunkkv`` (:mod:`.chunkkv`), ``simlayerkv`` (:mod:`.simlayerkv`) and
``chunked-topk`` (:mod:`.chunked`), scorer ``finch`` (:mod:`.finch`). Presets (budget ratio 0.2 unless
stated): ``chunkkv`` (SnapKV scores, window 64, kernel 5, as kvpress's SnapKVPress; 20-token chunks),
``simlayerkv`` (threshold 0.9, 4 sinks + 1024 recent on lazy layers; data-dependent size, nominal budget
0.5), ``finch`` (question = last 32 tokens), ``kvzip`` (the beyond plugin's ``reconstruction`` scorer with
kvpress's KVzipPress defaults, :mod:`.kvzip`). See ``docs/methods/structured.md``.
"""

from __future__ import annotations

from kvpolicy.hookspecs import hookimpl
from kvpolicy.registry import Preset

from kvpolicy_structured.chunked import ChunkedTopK, apportion
from kvpolicy_structured.chunkkv import ChunkKV, chunk_ids, chunk_rank, chunk_scores
from kvpolicy_structured.finch import Finch, question_attention
from kvpolicy_structured.kvzip import KVZIP_BUDGET, KVZIP_SCORER
from kvpolicy_structured.simlayerkv import SimLayerKV, lazy_scores

__all__ = ["ChunkKV", "ChunkedTopK", "Finch", "SimLayerKV", "apportion", "chunk_ids", "chunk_rank", "chunk_scores",
           "lazy_scores", "question_attention"]


@hookimpl
def kvpolicy_components() -> list[type]:
    return [ChunkKV, SimLayerKV, ChunkedTopK, Finch]


def _preset(name: str, desc: str, budget: dict, scorer: dict, selector: dict) -> Preset:
    return Preset(name, {"name": name, "description": desc, "budget": budget, "scorer": scorer, "selector": selector,
                         "merger": {"name": "none"}, "decode": {"name": "none"}, "layers": {"name": "uniform"}},
                  desc)


@hookimpl
def kvpolicy_presets() -> list[Preset]:
    return [
        _preset("chunkkv", "ChunkKV: whole 20-token chunks by mean SnapKV score (window 64, kernel 5), one choice "
                           "per layer, exact budget (last chunk partial)",
                {"ratio": 0.2, "sink": 0}, {"name": "snapkv", "window": 64, "kernel": 5},
                {"name": "chunkkv", "chunk": 20}),
        _preset("simlayerkv", "SimLayerKV: lazy layers (last query's attention on 4 sinks + 1024 recent > 0.9) keep "
                              "only those, the others everything; size data-dependent (nominal budget 0.5)",
                {"ratio": 0.5, "sink": 0}, {"name": "streaming"},
                {"name": "simlayerkv", "threshold": 0.9, "n_initial": 4, "n_recent": 1024, "n_last": 1}),
        _preset("finch", "Finch: the question's (last 32 tokens') normalised attention over the context, question "
                         "kept", {"ratio": 0.2, "sink": 0}, {"name": "finch", "window": 32, "normalize": True},
                {"name": "topk"}),
        _preset("kvzip-uniform", "KVzip's score with kvpress's KVzipPress defaults, every head and layer the same "
                         "count (layerwise); 2048-token chunks, 4 sinks; re-reads the context (4.2x a plain prefill on SmolLM2 at 2k)",
                KVZIP_BUDGET, KVZIP_SCORER, {"name": "topk"}),
    ]
