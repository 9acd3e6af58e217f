"""ThinK (Xu et al., "ThinK: Thinner Key Cache by Query-Driven Pruning", arXiv 2407.21018): prune key channels.

After the token selection of any scorer and selector, ThinK drops a share of each KV head's key *channels*:
channel ``j`` of head ``i`` scores ``||Q_i[-w:, j] · K_i[:, j]ᵀ||_F = ||Q_i[-w:, j]|| · ||K_i[:, j]||`` (the
observation window's queries against the kept keys), and the ``⌊pruned · D⌋`` lowest-scoring channels are
dropped. Values keep every channel. Queries meet the thinned keys in the kept channels only; keys of tokens
appended later keep every channel (the paper prunes the prompt's keys).

Decisions where the paper is silent or differs from kvpress:
- GQA: a KV head's channel score is the mean of its query heads' squared query norms times the key norm
  (kvpress averages the same way); channels are chosen per row and KV head, from that row's valid entries only.
- Real memory: kvpress's ``ThinKPress`` zeroes the pruned channels and keeps them in memory; here the cache
  stores the thinned keys ``[B, Hkv, K, D']`` and frees the rest (``Merged.key_channels``).
- It is one compression per context: decode rules that compact, and layer pooling, are refused.

Shapes: queries ``[B, H, w, D]``, keys ``[B, Hkv, S, D]``, channel scores ``[B, Hkv, D]`` fp32.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field
from torch import Tensor

from kvpolicy.policy import CompressionContext, Merged, Merger, Selection

from kvpolicy_baselines.steps import gather_kept


def channel_scores(queries: Tensor, keys: Tensor, kept: Tensor, query_valid: Tensor | None) -> Tensor:
    """``[B, Hkv, D]`` fp32: ``||Q[:, j]|| · ||K[:, j]||`` per KV head (query heads averaged in squares).

    ``queries [B, H, w, D]``, ``keys [B, Hkv, K, D]``, ``kept [B, Hkv or 1, K]`` bool (the entries that count),
    ``query_valid [B, w]`` or None."""
    b, h, _, d = queries.shape
    hkv = keys.shape[1]
    q = queries.float()
    if query_valid is not None:
        q = q * query_valid[:, None, :, None]
    qn = q.square().sum(2).view(b, hkv, h // hkv, d).mean(2)  # [B, Hkv, D]
    kn = (keys.float() * kept[..., None]).square().sum(2)  # [B, Hkv, D]
    return (qn * kn).sqrt()


class ThinK(Merger):
    """Keep the selected entries; store their keys in the best ``1 - pruned`` share of the channels."""

    name: ClassVar[str] = "think"
    paper: ClassVar[str] = "ThinK, Xu et al., ICLR 2025, arXiv:2407.21018"
    observations: ClassVar[frozenset[str]] = frozenset({"window_attention"})  # keeps the window's queries
    promises: ClassVar[frozenset[str]] = frozenset({"gather"})
    thins_keys: ClassVar[bool] = True
    pruned: float = Field(default=0.5, gt=0.0, lt=1.0, description="share of each KV head's key channels dropped")
    window: int = Field(default=32, ge=1, le=4096, description="observation window: the last prefill queries")

    def merge(self, ctx: CompressionContext, selection: Selection, scores: Tensor) -> Merged:
        k, v = gather_kept(ctx, selection)
        d = k.shape[-1]
        drop = int(self.pruned * d)
        if drop == 0:
            return Merged(keys=k, values=v)
        q = ctx._need_queries(f"ThinK's channel scores (window {self.window})")
        w = min(self.window, q.shape[2])
        qv = None if ctx.query_valid is None else ctx.query_valid[:, -w:]
        score = channel_scores(q[:, :, -w:], k, selection.kept.expand(k.shape[:3]), qv)
        keep = torch.topk(score, d - drop, dim=-1).indices.sort(dim=-1).values
        ctx.figures["key_channels"] = d - drop
        return Merged(keys=k, values=v, key_channels=keep)
