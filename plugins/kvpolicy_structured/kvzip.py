"""KVzip (arXiv 2505.23416) as a first-class preset, matched to kvpress's ``KVzipPress`` defaults.

The scorer is ``reconstruction`` from :mod:`kvpolicy_beyond.score` (referred to by name): after the
prefill the model re-reads its context ("Repeat the previous context exactly." then the context,
teacher-forced) and each entry scores the max attention it receives from those queries (max over the
queries and the query heads of its KV group). This module only chooses the parameters.

kvpress's ``KVzipPress`` defaults and what the ``kvzip`` preset does with each:

* ``n_sink = 4`` (the first 4 entries always kept) -> ``budget.sink: 4``; no recent window
  (``recent: 0``; the beyond plugin's ``kvzip-full`` keeps 10 % recent).
* reconstruction chunks of 2048 context tokens (``prepare(chunk_size=2048)``) -> ``chunk: 2048``, every
  chunk re-read (``stride: 1``, all its tokens).
* prompt "\\n\\nRepeat the previous context exactly." followed by the chat template's assistant header
  (``"\\n"`` for a tokenizer without a chat template) -> our default prompt, that text plus ``"\\n"``:
  the preset is model-agnostic; pass ``scorer.prompt`` to add a model's chat header. kvpress prompts
  chunks after the first with "Repeat the part of the previous context exactly, starting with" and the
  previous chunk's last 8 tokens; ours repeats the first prompt (identical below 2048 tokens: one chunk).
* kvpress scores a chunk's queries against the sinks, that chunk and the repeated tokens only; ours
  against the whole context (identical for a single chunk).
* ``layerwise = False`` (kvpress's default): one top-k over all layers and heads, so layers and heads
  keep different counts (kvpress masks evicted entries instead of shrinking the cache). A kvpolicy cache
  is dense: every KV head of a layer keeps the same count, and the ``uniform`` schedule gives every layer
  the same budget, i.e. kvpress's ``layerwise = True`` with a per-head (not joint-over-heads) top-k.
* ``kvzip_plus_normalization = False`` -> not implemented (plain attention scores).

Cost: the re-read is a second forward of the context (plus the prompt per chunk) over the full cache, with
an fp32 max-attention observation per layer: on SmolLM2 with 2000 tokens a ``kvzip`` prefill took 4.2x a
plain one (``benchmarks/kvzip_cost.py``; ``docs/methods/structured.md``). The bench
harness cannot replay it.
"""

from __future__ import annotations

from typing import Any

KVZIP_SCORER: dict[str, Any] = {"name": "reconstruction", "chunk": 2048, "stride": 1}
KVZIP_BUDGET: dict[str, Any] = {"ratio": 0.2, "sink": 4, "recent": 0}
