"""The ``value-norm`` scorer: attention received, weighted by the norm of the entry's value.

VATP (Guo et al., "Attention Score is not All You Need for Token Importance Indicator in KV Cache
Reduction: Value Also Matters", arXiv 2406.12335) observes that an entry's contribution to the
attention output is its attention weight *times* its value vector, so an entry with a tiny value
contributes little however much attention it gets. The score of entry ``j`` is

    s_j = a_j * ||v_j||_p

where ``a_j`` is the attention ``j`` received (all prefill queries, as H2O, or the last ``window``
queries, as SnapKV) and ``||v_j||_p`` the ``p``-norm of its value (``p = 1`` in the paper).
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field
from torch import Tensor

from kvpolicy import CompressionContext, Scorer


class ValueNorm(Scorer):
    """VATP: attention received times the value's p-norm (an entry with a small value matters little)."""

    name: ClassVar[str] = "value-norm"
    paper: ClassVar[str] = "VATP, Guo et al., EMNLP 2024, arXiv:2406.12335"
    observations: ClassVar[frozenset[str]] = frozenset({"accumulated_attention", "window_attention"})

    window: int = Field(default=0, ge=0, description="attention of the last `window` queries; 0 = all queries")
    p: Literal[1, 2] = Field(default=1, description="norm of the value vectors: 1 (the paper) or 2")

    def score(self, ctx: CompressionContext) -> Tensor:
        """``[B, Hkv, S]`` fp32 scores from ``ctx.values [B, Hkv, S, D]`` and the attention statistics."""
        attn = ctx.window_attention(self.window) if self.window else ctx.accumulated_attention()
        vnorm = ctx.values.float().norm(p=self.p, dim=-1)  # fp32 even for fp16/bf16 caches
        return attn * vnorm
