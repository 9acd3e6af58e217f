"""Scores that anticipate future queries.

* ``reconstruction`` (the KVzip idea, arXiv 2505.23416; our own code): after the prefill the model
  re-reads its context ("Repeat the previous context:" then the context tokens, teacher-forced) in an
  observe-only pass over the full cache; each entry's score is the max attention it receives from those
  queries (max over the queries and the query heads of its KV group). The cache defers the prefill
  compression until that pass is done (see :class:`kvpolicy.policy.ReconstructionPlan`). Cheaper
  proxies: ``stride`` (re-read every ``stride``-th chunk only: entries of skipped chunks are still
  scored by the queries of the others, which see the whole context) and ``tokens`` (re-read only the
  first tokens of each chunk).
* ``max-attention``: the zero-extra-cost proxy, the max attention each entry received from the
  prefill's own queries.

Both return ``[B, Hkv, S]`` fp32; the budget's sinks and recent window are protected by the selector.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field
from torch import Tensor

from kvpolicy.policy import CompressionContext, ReconstructionPlan, Scorer

DEFAULT_PROMPT = "\n\nRepeat the previous context exactly.\n"


class Reconstruction(Scorer):
    """KVzip-style: max attention each entry receives while the model re-reads its context."""

    name: ClassVar[str] = "reconstruction"
    paper: ClassVar[str] = "KVzip, Kim et al. 2025, arXiv:2505.23416"
    comparable: ClassVar[bool] = True  # attention masses: one scale across heads and layers
    observations: ClassVar[frozenset[str]] = frozenset({"reconstruction_attention"})
    prompt: str = Field(default=DEFAULT_PROMPT, description="text fed before the context is re-read")
    chunk: int = Field(default=512, ge=1, description="context tokens re-read per forward")
    stride: int = Field(default=1, ge=1, description="re-read every stride-th chunk only (cheaper proxy)")
    tokens: int | None = Field(default=None, ge=1, description="re-read only the first tokens of each chunk")

    def reconstruction_plan(self) -> ReconstructionPlan:
        return ReconstructionPlan(prompt=self.prompt, chunk=self.chunk, stride=self.stride, tokens=self.tokens)

    def score(self, ctx: CompressionContext) -> Tensor:
        return ctx.reconstruction_attention()


class MaxAttention(Scorer):
    """Max attention each entry received from the prefill's queries (no extra pass)."""

    name: ClassVar[str] = "max-attention"
    paper: ClassVar[str] = "kvpolicy's own (docs/methods/beyond.md)"
    comparable: ClassVar[bool] = True  # attention masses: one scale across heads and layers
    observations: ClassVar[frozenset[str]] = frozenset({"max_attention"})

    def score(self, ctx: CompressionContext) -> Tensor:
        return ctx.max_attention()
