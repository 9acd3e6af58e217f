"""Chunked top-k (kvpress's ``FinchPress(chunk_length=...)``): every chunk of the prompt keeps its share.

Per layer and row, the valid entries are cut into chunks of ``chunk`` consecutive entries from the row's
first valid entry (as :mod:`kvpolicy_structured.chunkkv`). The budget's sinks and recent window are kept;
the rest of the layer budget ``R`` is shared among the chunks in proportion to their unprotected entries
``n_m``: ``q_m = ⌊R n_m / N⌋``, the remainder to the largest fractional parts (ties to the earlier chunk),
so the quotas add up to ``R`` exactly. Each chunk then keeps its ``q_m`` best-scoring unprotected entries,
per KV head (or per layer for a layer-shared score); ties go to the lower position.

Decisions: kvpress keeps ``max(1, ⌊|chunk| · ratio⌋)`` entries of every chunk, question included, so its
size is not exactly the budget; ours is. A question (Finch's window) is not protected by the quotas: a
short last chunk may not have room for it; give the budget a recent window the size of the question
(``budget.recent: 32``) to keep it whole. Not "nested": largest-remainder quotas can move a slot between
chunks as the budget grows (the Alabama paradox). A prior (e.g. LOOK-M's text prior) ranks before the quotas.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field
from torch import Tensor

from kvpolicy import ops
from kvpolicy.policy import CompressionContext, Selection, Selector
from kvpolicy_structured.chunkkv import chunk_ids


def apportion(total: Tensor, sizes: Tensor) -> Tensor:
    """Largest-remainder shares: ``[B, M]`` integers ``<= sizes`` adding up to ``total [B]`` (``<= sizes.sum``).

    ``q_m = ⌊total · n_m / N⌋`` plus one for the ``total - Σ q`` chunks of largest remainder (ties to the
    lower chunk); exact integer arithmetic.
    """
    n = sizes.sum(-1, keepdim=True).clamp_min(1)
    num = total.view(-1, 1) * sizes
    base, rem = num // n, num % n
    left = total - base.sum(-1)
    order = torch.sort(rem, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1], device=order.device)
                                            .expand_as(order).contiguous())
    return base + (rank < left.view(-1, 1)).long()


class ChunkedTopK(Selector):
    """Per-chunk top-k: each chunk of ``chunk`` tokens keeps its proportional share of the budget."""

    name: ClassVar[str] = "chunked-topk"
    paper: ClassVar[str] = "FINCH (chunked), TACL 2024, doi:10.1162/tacl_a_00716"
    promises: ClassVar[frozenset[str]] = frozenset({"exact_size", "protected"})
    chunk: int = Field(default=2048, ge=1, description="tokens per chunk (kvpress's chunk_length)")

    def select(self, ctx: CompressionContext, scores: Tensor, priority: Tensor | None) -> Selection:
        b, hs, s = scores.shape
        valid = ctx.valid[:, :hs] if hs == 1 else ctx.valid  # [B, Hs, S]
        forced = ops.protected_mask(valid, ctx.budget.sink, ctx.budget.recent)
        total = ctx.budget.total.to(scores.device)
        ids, n_chunks = chunk_ids(valid[:, :1], self.chunk)  # [B, 1, S]: chunks are the same for every head
        pool = valid[:, :1] & ~forced[:, :1]
        sizes = torch.zeros(b, n_chunks + 1, dtype=torch.long, device=scores.device).scatter_add_(
            1, ids[:, 0], pool[:, 0].long())[:, :n_chunks]
        room = (total - forced[:, 0].sum(-1)).clamp_min(0)
        quota = apportion(torch.minimum(room, sizes.sum(-1)), sizes)  # [B, n_chunks]
        # order each head's entries by (chunk, unprotected first, score desc, position): three stable sorts
        order = torch.sort(torch.where(valid, scores.float(), float("-inf")), dim=-1, descending=True,
                           stable=True).indices
        order = order.gather(-1, torch.sort(pool.expand(b, hs, s).gather(-1, order).to(torch.int8), dim=-1,
                                            descending=True, stable=True).indices)
        cid = ids.expand(b, hs, s).gather(-1, order)
        srt = torch.sort(cid, dim=-1, stable=True)
        order, cid = order.gather(-1, srt.indices), srt.values
        sizes_all = torch.zeros(b, hs, n_chunks + 1, dtype=torch.long, device=scores.device).scatter_add_(
            2, cid, torch.ones_like(cid))
        start = (sizes_all.cumsum(-1) - sizes_all).gather(-1, cid)
        within = torch.arange(s, device=scores.device).expand(b, hs, s) - start  # rank inside the chunk
        quota_full = torch.cat([quota, torch.zeros_like(quota[:, :1])], dim=1)  # [B, n_chunks + 1]
        take = pool.expand(b, hs, s).gather(-1, order) & (within < quota_full.unsqueeze(1).expand(b, hs, -1)
                                                          .gather(-1, cid))
        chosen = torch.zeros_like(take).scatter_(-1, order, take)
        rank = chosen.long() if priority is None else priority.long() * 2 + chosen.long()  # a prior ranks first
        idx, kept = ops.topk_keep(scores, int(total.max()), valid=valid, forced=forced, priority=rank, per_row=total)
        ctx.figures.update(chunks=n_chunks)
        return Selection(indices=idx, kept=kept)
