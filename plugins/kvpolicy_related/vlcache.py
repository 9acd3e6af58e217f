"""VL-Cache (Tu et al., arXiv 2410.23317, "VL-Cache: Sparsity and Modality-Aware KV Cache Compression for
Vision-Language Model Inference Acceleration").

A vision-language prompt is ``[text][visual tokens][question]``. VL-Cache observes that the queries that
matter for decoding are the **post-vision** ones (the language tokens after the last visual token): their
attention, not the visual tokens' attention among themselves, tells which entries (visual and textual) the
answer will read. Two parts, both from that post-vision attention ``A[i, j]`` (``i`` a post-vision query):

    token score       s_j = sum_{i post-vision} mean_{h in group(kappa)} A_h[i, j]
    layer sparsity    gamma_l = share of the visible (i, j) of the post-vision rows with A_h[i, j] < tau max_j A_h[i, j]
    layer budget      VL-Cache gives layer l a share of the total in proportion to its density 1 - gamma_l

The scorer ``post-vision`` is the modality-aware score; the selector ``vlcache-sparsity`` is the
sparsity-aware budget, realised within kvpolicy's interface (below). Preset ``vlcache``.

Decisions:

* **Layer budgets.** VL-Cache allocates the layers' budgets after measuring every layer's sparsity on the
  prompt. kvpolicy resolves every layer's budget before layer 0 is compressed (``KVPolicyCache.begin_forward``:
  a bad budget fails before the cache changes) and compresses each layer right after its own attention, so
  a layer cannot know the deeper layers' sparsity. Here the layer budget ``B_l`` is a **ceiling** and the
  layer keeps ``k_l = min(B_l, max(protected, ceil((1 - gamma_l) n)))`` entries (``n`` its valid tokens):
  as many as a post-vision query's attention has non-negligible entries on average. Sparse layers keep
  less than the budget, dense ones at most the budget; the total is therefore at most, not exactly, what a
  uniform budget keeps, and no layer gets more than ``B_l`` (VL-Cache can give a dense layer more).
  Figures per layer: ``vl_density`` (``1 - gamma_l``) and ``vl_kept``.
* **Post-vision queries** are the valid queries after the row's last visual entry; a row without visual
  entries counts all its queries (the score is then H2O's accumulated attention); a row whose prompt ends
  with the image uses its last query.
* ``tau`` (``threshold``) default 0.01 (1 % of the row maximum). Sparsity is counted over the query heads
  of the layer (each row of each head), the score reduced to its KV head by the group mean.
* Sinks and the recent window are kept first (``topk``'s rules), inside ``k_l``.

Shapes: queries ``[B, H, Q, D]``, keys ``[B, Hkv, S, D]``, scores ``[B, Hkv, S]`` fp32. Attention by query
chunks, never ``S x S``.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field
from torch import Tensor

from kvpolicy import observe, ops
from kvpolicy.policy import CompressionContext, Scorer, Selection, Selector


def post_vision_queries(ctx: CompressionContext) -> Tensor:
    """``[B, Q]`` bool: the event's valid queries after the row's last visual entry (all valid queries
    when the row has none; the last valid query when none follows the image)."""
    q = ctx._need_queries("VL-Cache's post-vision attention")
    b, qn = q.shape[0], q.shape[2]
    qvalid = ctx.query_valid if ctx.query_valid is not None else torch.ones(b, qn, dtype=torch.bool, device=q.device)
    img = ctx.is_image[:, 0] & ctx.valid[:, 0]  # [B, S]
    last_img = torch.where(img, ctx.positions[:, 0], -1).amax(-1)  # [B], -1 when no visual entry
    post = qvalid & (ctx.query_pos > last_img[:, None])
    last_q = torch.where(qvalid, torch.arange(qn, device=q.device), -1).amax(-1)  # [B]
    none = ~post.any(-1) & (last_q >= 0)
    post[none, last_q[none]] = True
    return post


def post_vision_density(ctx: CompressionContext, threshold: float) -> Tensor:
    """``[B]`` fp32: ``1 - gamma_l``, the share of visible entries whose post-vision attention is at least
    ``threshold`` times its row's maximum (over the query heads and post-vision queries of each row)."""
    q = ctx._need_queries("VL-Cache's layer sparsity")
    post = post_vision_queries(ctx)
    b = q.shape[0]
    valid = ctx.valid[:, :1]
    dense = torch.zeros(b, dtype=torch.float64, device=q.device)
    seen = torch.zeros(b, dtype=torch.float64, device=q.device)
    for lo, probs, _ in observe._prob_chunks(q, ctx.keys, ctx.scaling, ctx.query_pos, ctx.positions, ctx.key_bias,
                                             post, ops.DEFAULT_CHUNK_BYTES, ctx.form):
        c, n = probs.shape[3], probs.shape[4]
        ok = post[:, lo:lo + c]  # [B, c]
        top = probs.amax(-1, keepdim=True)
        big = ((probs >= threshold * top) & (probs > 0)).sum(-1).double()  # [B, Hkv, g, c]
        vis = (valid[:, :, None, :n] & (ctx.positions[:, :1, None, :n] <= ctx.query_pos[:, None, lo:lo + c, None]))
        t = vis.sum(-1).double()  # [B, 1, c] visible entries per query
        heads = probs.shape[1] * probs.shape[2]
        dense += torch.where(ok[:, None, None, :], big, 0.0).sum((1, 2, 3))
        seen += torch.where(ok[:, None, :], t, 0.0).sum((1, 2)) * heads
    return (dense / seen.clamp_min(1)).float()


class PostVision(Scorer):
    """VL-Cache: attention accumulated from the post-vision queries (the language tokens after the last image)."""

    name: ClassVar[str] = "post-vision"
    paper: ClassVar[str] = "VL-Cache, Tu et al., ICLR 2025, arXiv:2410.23317"
    observations: ClassVar[frozenset[str]] = frozenset({"window_attention"})

    def score(self, ctx: CompressionContext) -> Tensor:
        q = ctx._need_queries("VL-Cache's post-vision attention")
        acc = observe.attention_colsum(q, ctx.keys, scaling=ctx.scaling, query_pos=ctx.query_pos,
                                       key_pos=ctx.positions, key_bias=ctx.key_bias,
                                       query_valid=post_vision_queries(ctx), form=ctx.form)
        return torch.where(ctx.valid, acc, float("-inf"))


class VLCacheSparsity(Selector):
    """VL-Cache's sparsity-aware budget: keep min(budget, ceil(density * n)) entries (post-vision density)."""

    name: ClassVar[str] = "vlcache-sparsity"
    paper: ClassVar[str] = "VL-Cache, Tu et al., ICLR 2025, arXiv:2410.23317"
    observations: ClassVar[frozenset[str]] = frozenset({"window_attention"})
    promises: ClassVar[frozenset[str]] = frozenset({"protected"})
    threshold: float = Field(default=0.01, gt=0.0, le=1.0,
                             description="tau: an attention below tau * its row's max counts as sparse")

    def select(self, ctx: CompressionContext, scores: Tensor, priority: Tensor | None) -> Selection:
        hs = scores.shape[1]
        valid = ctx.valid[:, :hs] if hs == 1 else ctx.valid
        recent = ctx.budget.recent.to(scores.device)
        forced = ops.protected_mask(valid, ctx.budget.sink, recent)
        n = ctx.valid_count().to(scores.device)
        density = post_vision_density(ctx, self.threshold).to(scores.device)
        need = torch.ceil(density.double() * n.double()).long()
        protected = forced[:, 0].sum(-1)
        per_row = torch.minimum(ctx.budget.total.to(scores.device), torch.maximum(need, protected).clamp_min(1))
        idx, kept = ops.topk_keep(scores, int(per_row.max()), valid=valid, forced=forced, priority=priority,
                                  per_row=per_row)
        ctx.figures["vl_density"] = round(float(density.mean()), 6)
        ctx.figures["vl_kept"] = int(per_row.max())
        return Selection(indices=idx, kept=kept)


__all__ = ["PostVision", "VLCacheSparsity", "post_vision_density", "post_vision_queries"]
