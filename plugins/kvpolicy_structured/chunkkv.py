"""ChunkKV (arXiv 2502.00299): keep whole chunks of contiguous tokens, ranked by their aggregated score.

Per layer and row, with any scorer's scores ``s [B, Hkv or 1, S]`` (the preset: SnapKV-style window
attention) and chunk size ``c``:

1. the scores are shared by the heads of the layer: ``s̄_j = mean_h s_hj`` (kvpress sums over heads; the
   ranking is the same), one decision per layer as in kvpress's ``ChunkKVPress``;
2. the valid entries of the row are cut into chunks of ``c`` consecutive entries, counted from the row's
   first valid entry (the last chunk may be shorter): chunk ``C_m = {j : ⌊rank_j / c⌋ = m}``;
3. chunk score ``S_m = mean_{j ∈ C_m} s̄_j`` (kvpress: the mean over the chunk's tokens, a short last
   chunk over its own length);
4. entries are taken in the order (budget sinks and recent window first, then the chunks by decreasing
   ``S_m``, inside a chunk by decreasing ``s̄_j``) until the layer budget is full.

Decisions where the paper and kvpress are silent or differ:

* **Budget met exactly, partial last chunk.** kvpress keeps ``max(1, ⌊n_chunks · ratio⌋)`` whole chunks, so
  its size is a multiple of ``c`` (±the short last chunk); we keep exactly the layer budget: whole chunks
  in score order, then the best-scoring entries (by ``s̄_j``, ties to the lower position) of the next
  chunk. At most one chunk per row is partial.
* **Chunks are aligned to the row's first valid entry**, not to the physical slot, so a row alone and the
  same row left-padded in a batch cut the same chunks (kvpress aligns to slot 0 and takes the chunk
  choice of batch row 0 for every row).
* **The budget's sinks and recent window** are kept before any chunk (the preset has none: its SnapKV
  scorer already ranks its observation window above every prefix entry, so the chunks covering the window
  come first, as kvpress's padding of the window with ``max + 1`` intends).
* **Priors** (e.g. LOOK-M's text prior) rank before the chunk order: ``priority`` reduced over heads by
  the max, then the chunk rank, then the entry score.
* The paper's layer-wise index reuse (sharing one layer's chunk choice with the next layers) is not
  implemented (kvpress does not either): every layer chooses from its own scores.

Aggregation runs in float64 over ``[B, n_chunks]`` with one ``scatter_add``; no ``L x L`` tensor.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field
from torch import Tensor

from kvpolicy import ops
from kvpolicy.policy import CompressionContext, Selection, Selector

_BIG = 1e30  # ±inf scores are clamped here before the chunk mean (a finite extreme keeps its rank)


def chunk_ids(valid: Tensor, chunk: int) -> tuple[Tensor, int]:
    """Chunk index of every entry: ``⌊valid rank / chunk⌋`` for valid entries, ``n_chunks`` for the others.

    Args:
        valid: ``[B, 1, S]`` bool.
    Returns:
        ``ids [B, 1, S]`` long and ``n_chunks`` (the largest number of chunks of a row).
    """
    rank, count = ops.valid_rank(valid)
    n_chunks = max(1, -(-int(count.max()) // chunk)) if count.numel() else 1
    return torch.where(valid, rank.clamp_min(0) // chunk, n_chunks), n_chunks


def chunk_scores(scores: Tensor, ids: Tensor, n_chunks: int) -> Tensor:
    """Mean score of each chunk, ``[B, n_chunks]`` float64 (``-inf`` for a chunk with no entry).

    Args:
        scores: ``[B, 1, S]`` per-entry scores; ids: ``[B, 1, S]`` from :func:`chunk_ids`.
    """
    b = scores.shape[0]
    s = scores.double().clamp(-_BIG, _BIG).reshape(b, -1)
    idx = ids.reshape(b, -1)
    sums = torch.zeros(b, n_chunks + 1, dtype=torch.float64, device=scores.device).scatter_add_(1, idx, s)
    counts = torch.zeros_like(sums).scatter_add_(1, idx, torch.ones_like(s))
    mean = sums / counts.clamp_min(1)
    return torch.where(counts > 0, mean, float("-inf"))[:, :n_chunks]


def chunk_rank(per_chunk: Tensor) -> Tensor:
    """Rank of each chunk by decreasing score (0 = best; ties to the lower chunk), ``[B, n_chunks]`` long."""
    order = torch.sort(per_chunk, dim=-1, descending=True, stable=True).indices
    return torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1], device=order.device)
                                            .expand_as(order).contiguous())


class ChunkKV(Selector):
    """ChunkKV: keep whole chunks of ``chunk`` contiguous tokens by their mean score (one choice per layer)."""

    name: ClassVar[str] = "chunkkv"
    paper: ClassVar[str] = "ChunkKV, Liu et al. 2025, arXiv:2502.00299"
    promises: ClassVar[frozenset[str]] = frozenset({"exact_size", "protected", "nested"})
    chunk: int = Field(default=20, ge=1, description="tokens per chunk (kvpress's chunk_length)")

    def select(self, ctx: CompressionContext, scores: Tensor, priority: Tensor | None) -> Selection:
        valid = ctx.valid[:, :1]  # [B, 1, S]
        shared = scores.float().mean(1, keepdim=True)  # [B, 1, S]: the layer's heads decide together
        ids, n_chunks = chunk_ids(valid, self.chunk)
        rank = chunk_rank(chunk_scores(torch.where(valid, shared, 0.0), ids, n_chunks))  # [B, n_chunks]
        rank = torch.cat([rank, torch.full_like(rank[:, :1], n_chunks)], dim=1)  # the slot of invalid entries
        order = (n_chunks - rank.gather(1, ids[:, 0])).unsqueeze(1).double()  # [B, 1, S]: higher = earlier chunk
        if priority is not None:  # a prior ranks first, then the chunk order (both integer-valued)
            order = priority.double().amax(1, keepdim=True) * (n_chunks + 1) + order
        forced = ops.protected_mask(valid, ctx.budget.sink, ctx.budget.recent)
        total = ctx.budget.total.to(scores.device)
        idx, kept = ops.topk_keep(shared, int(total.max()), valid=valid, forced=forced, priority=order,
                                  per_row=total)
        whole = _whole_chunks(ids, n_chunks, idx, kept)
        ctx.figures.update(chunks=n_chunks, chunks_whole=round(float(whole.float().mean()), 1))
        return Selection(indices=idx, kept=kept)


def _whole_chunks(ids: Tensor, n_chunks: int, idx: Tensor, kept: Tensor) -> Tensor:
    """``[B]`` number of chunks of which every entry was kept."""
    b = ids.shape[0]
    flat = ids.reshape(b, -1)
    size = torch.zeros(b, n_chunks + 1, device=ids.device).scatter_add_(1, flat, torch.ones_like(flat, dtype=torch.float))
    got = torch.zeros_like(size).scatter_add_(1, flat.gather(1, idx[:, 0]), kept[:, 0].float())
    return ((got == size) & (size > 0))[:, :n_chunks].sum(-1)
