"""Eviction baselines' scores: each is one short function of the layer's observations.

* accumulated-attention (H2O, arXiv 2306.14048): attention each entry received from all queries.
* snapkv (arXiv 2404.14469): attention from the last ``window`` queries, pooled over positions; the
  window itself is always kept.
* tova (arXiv 2401.06104): attention of the last query, averaged over heads (one decision per layer).
* knorm (arXiv 2406.11430): low key norm means important.
* streaming (arXiv 2309.17453): recency; with the budget's sinks this is StreamingLLM.
* random: a seeded random order.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from kvpolicy import ops
from kvpolicy.policy import CompressionContext, Scorer


class AccumulatedAttention(Scorer):
    """H2O heavy hitters: column sums of the attention of every query seen (GQA: group mean).

    ``query_stride: s > 1`` estimates the sums from every ``s``-th prefill query (the last one included),
    at ``1/s`` of the cost; ``1`` (default) is exact and computed inside the prefill attention.
    """

    name: ClassVar[str] = "accumulated-attention"
    paper: ClassVar[str] = "H2O, Zhang et al., NeurIPS 2023, arXiv:2306.14048"
    comparable: ClassVar[bool] = True  # attention masses: one scale across heads and layers
    observations: ClassVar[frozenset[str]] = frozenset({"accumulated_attention"})
    query_stride: int = Field(default=1, ge=1, le=4096,
                              description="estimate from every s-th prefill query (1 = exact)")

    def score(self, ctx: CompressionContext) -> Tensor:
        return ctx.accumulated_attention(self.query_stride)


WINDOW_FLOOR = float(2**23)  # SnapKV window scores: above any pooled vote, below 2**24 (fp32-exact integers)


class SnapKV(Scorer):
    """SnapKV: observation-window attention, pooled over neighbouring positions; window kept.

    Pooling rule (SnapKV's code and kvpress): only the votes of the prefix (the valid entries before the
    window) are pooled; the window's own votes and padding count as zero, and a kernel truncated at either
    edge of the prefix is still divided by the full kernel size (``count_include_pad``). So the sequence
    start and a left-padded start pool alike: a row alone and the same row left-padded in a batch get the
    same scores. Window entries score above every prefix entry, ordered by recency, so a budget smaller
    than the window keeps its most recent entries.
    """

    name: ClassVar[str] = "snapkv"
    paper: ClassVar[str] = "SnapKV, Li et al., NeurIPS 2024, arXiv:2404.14469"
    comparable: ClassVar[bool] = True  # attention masses: one scale across heads and layers
    observations: ClassVar[frozenset[str]] = frozenset({"window_attention"})
    window: int = Field(default=32, ge=1, description="observation window: the last queries that vote")
    kernel: int = Field(default=7, ge=1, description="pooling kernel size over positions (odd)")
    pooling: Literal["avg", "max"] = "avg"

    def score(self, ctx: CompressionContext) -> Tensor:
        votes = ctx.window_attention(self.window)  # [B, Hkv, S]
        b, h, s = votes.shape
        rank, count = ops.valid_rank(ctx.valid)
        in_window = ctx.valid & (rank >= count.unsqueeze(-1) - self.window)
        prefix_votes = torch.where(ctx.valid & ~in_window, votes, 0.0)  # votes >= 0: zeros pool as padding
        flat = prefix_votes.reshape(b * h, 1, s)
        k = self.kernel if self.kernel % 2 == 1 else self.kernel + 1
        if self.pooling == "avg":
            pooled = F.avg_pool1d(flat, k, stride=1, padding=k // 2, count_include_pad=True)
        else:
            pooled = F.max_pool1d(flat, k, stride=1, padding=k // 2)
        scores = pooled.reshape(b, h, s)
        # pooled votes are at most `window`; 2**23 + rank is exact in fp32 for ranks below 2**23
        return torch.where(in_window, WINDOW_FLOOR + rank.float(), scores)


class TOVA(Scorer):
    """TOVA: attention of the last query, averaged over heads; one decision per layer."""

    name: ClassVar[str] = "tova"
    paper: ClassVar[str] = "TOVA, Oren et al. 2024, arXiv:2401.06104"
    comparable: ClassVar[bool] = True  # attention masses: one scale across heads and layers
    observations: ClassVar[frozenset[str]] = frozenset({"window_attention"})

    def score(self, ctx: CompressionContext) -> Tensor:
        return ctx.last_query_attention().mean(dim=1, keepdim=True)


class KeyNorm(Scorer):
    """KnormPress: keep the keys of smallest L2 norm."""

    name: ClassVar[str] = "knorm"
    paper: ClassVar[str] = "Knorm, Devoto et al., EMNLP 2024, arXiv:2406.11430"
    observations: ClassVar[frozenset[str]] = frozenset({"key_norms"})

    def score(self, ctx: CompressionContext) -> Tensor:
        return -ctx.key_norms()


class Recency(Scorer):
    """StreamingLLM: the more recent the better (sinks come from the budget)."""

    name: ClassVar[str] = "streaming"
    paper: ClassVar[str] = "StreamingLLM, Xiao et al., ICLR 2024, arXiv:2309.17453"

    def score(self, ctx: CompressionContext) -> Tensor:
        return ctx.positions[:, :1].float()


class RandomScore(Scorer):
    """Uniformly random order, seeded per layer (shared by all heads unless per_head).

    The i-th valid entry of a row gets the i-th draw of the layer's (and head's) generator, so the order
    does not depend on the batch or on left padding.
    """

    name: ClassVar[str] = "random"
    seed: int = 0
    per_head: bool = False

    def score(self, ctx: CompressionContext) -> Tensor:
        b, h, s = ctx.shape
        heads = h if self.per_head else 1
        base = self.seed * 100003 + ctx.layer_idx
        draws = torch.stack([torch.rand(s, generator=torch.Generator(device="cpu").manual_seed(base + 7919 * j))
                             for j in range(heads)])  # [heads, S]; a prefix of a longer draw is the same
        rank, _ = ops.valid_rank(ctx.valid[:, :heads])
        return draws.to(ctx.keys.device).expand(b, heads, s).gather(-1, rank.clamp_min(0))
