"""SimLayerKV (arXiv 2410.13846): "lazy" layers keep only their sinks and recent window, the others all.

Per layer and row, with the attention ``A[i, j]`` of the last ``n_last`` valid queries (query heads
reduced to their KV head by the mean, then averaged over the KV heads, i.e. over all query heads):

* kept set of a lazy layer ``K = {first n_initial valid entries} ∪ {last n_recent valid entries}``
  (StreamingLLM's sinks + recent window; the last token is part of the window);
* lazy score ``m = (1 / n_last) Σ_{i ∈ last} Σ_{j ∈ K} A[i, j]``: the attention mass the last queries
  put on exactly the entries a lazy layer would keep;
* the layer is lazy for that row iff ``m > threshold``: it keeps ``K``; otherwise it keeps every entry.
  A row with at most ``n_initial + n_recent`` valid entries is never compressed (kvpress: no compression
  below ``n_initial + n_recent + n_last`` tokens).

Decisions:

* **Defaults as kvpress's ``SimLayerKVPress``**: ``n_initial 4``, ``n_recent 1024``, ``n_last 1`` (its
  "SKLV-decode" form). kvpress's ``lazy_threshold`` defaults to 1.0, which disables compression; the
  paper recommends 0.9 for Llama-3, 0.65 for Llama-2, 0.8 for Mistral, 0.85 for Qwen. Our preset takes
  0.9 (SmolLM2 is a Llama-architecture model trained like Llama-3; ``docs/methods/structured.md`` gives
  the lazy scores measured on it).
* **The score covers the kept set** (``window_rule: paper``, the default). The paper's code sums the last
  query's attention over keys ``[0:4]`` and ``[-1024:]`` (the query's own key included), as we do.
  kvpress reuses SnapKV's window helper, which drops the last ``n_last`` key columns, so its recent sum
  covers the ``n_recent`` keys before the last ``n_last`` tokens, its lazy layers keep
  ``n_initial + n_recent - n_last`` entries and a row needs more than ``n_initial + n_recent + n_last``
  tokens to be compressed: ``window_rule: kvpress`` reproduces that (on SmolLM2 the two rules disagree on
  9 of 30 layers at threshold 0.9: the last token's attention to itself is a large share of its mass).
* **One decision per layer and row** (the mean over all query heads; kvpress averages over the batch too,
  which would make a row's decision depend on the other rows).
* **The budget is not a target** (kvpress's ``compression_ratio`` of this press is read-only: the mean
  achieved ratio). A layer budget below the row's length only switches the selector on; the size is what
  the lazy rule gives, reported in ``ctx.figures`` (``lazy`` rows, ``lazy_score``, ``entries``,
  ``achieved_ratio``, ``over_budget``). A layer left above its budget raises a
  :class:`~kvpolicy.errors.BudgetWarning` once per distinct message, as KVMerger's ``fixed`` mode does.
* Prefill only (decode rule ``none``); the scores of the policy's scorer are not used.
"""

from __future__ import annotations

import warnings
from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor

from kvpolicy import ops
from kvpolicy.errors import BudgetWarning
from kvpolicy.policy import CompressionContext, Selection, Selector


def lazy_scores(ctx: CompressionContext, keep: Tensor, n_last: int) -> Tensor:
    """``[B]`` fp32: attention mass of the last ``n_last`` valid queries on the entries ``keep [B, 1, S]``.

    Mean over the queries (pads among them count nothing) and over every query head of the layer.
    """
    attn = ctx.window_attention(n_last)  # [B, Hkv, S]: summed over the queries, group mean per KV head
    q = min(n_last, ctx.queries.shape[2]) if ctx.queries is not None else n_last
    n_q = torch.full((attn.shape[0],), float(q), device=attn.device)
    if ctx.query_valid is not None:
        n_q = ctx.query_valid[:, -q:].float().sum(-1)
    mass = (attn * keep).sum(-1).mean(-1)  # [B]
    return mass / n_q.clamp_min(1)


def _warn_over_budget(ctx: CompressionContext, threshold: float) -> None:
    """One :class:`~kvpolicy.errors.BudgetWarning` per distinct message (Python's default filter)."""
    size = (f"ratio {ctx.budget.ratio}" if ctx.budget.ratio is not None
            else f"{int(ctx.budget.total.max())} tokens")
    warnings.warn(
        f"selector 'simlayerkv' (threshold {threshold}) keeps what its lazy-layer rule gives, more than the budget "
        f"({size}) on some layers (figures 'entries', 'lazy', 'over_budget'); SimLayerKV decides its size itself "
        f"(the budget only switches compression on): use a budget-driven preset such as 'streaming' or 'snapkv' "
        f"for a fixed size", BudgetWarning, stacklevel=2)


class SimLayerKV(Selector):
    """SimLayerKV: a layer whose last query looks at its sinks + recent window keeps only those, others all."""

    name: ClassVar[str] = "simlayerkv"
    paper: ClassVar[str] = "SimLayerKV, Zhang et al. 2024, arXiv:2410.13846"
    observations: ClassVar[frozenset[str]] = frozenset({"window_attention"})
    threshold: float = Field(default=0.9, ge=0.0, le=1.0, description="lazy if the last queries' attention on "
                             "the sinks + recent window exceeds this (1.0: never lazy)")
    n_initial: int = Field(default=4, ge=0, description="sink tokens a lazy layer keeps")
    n_recent: int = Field(default=1024, ge=1, description="recent tokens a lazy layer keeps (the last one included)")
    n_last: int = Field(default=1, ge=1, description="last queries whose attention decides")
    window_rule: Literal["paper", "kvpress"] = Field(
        default="paper", description="paper: score the kept sinks + recent window (last token included); kvpress: "
        "score the n_recent keys before the last n_last tokens, keep n_initial + n_recent - n_last")

    def select(self, ctx: CompressionContext, scores: Tensor, priority: Tensor | None) -> Selection:
        valid = ctx.valid[:, :1]  # [B, 1, S]
        n = valid.sum(-1).view(-1)  # [B]
        if self.window_rule == "paper":
            streaming = ops.protected_mask(valid, self.n_initial, self.n_recent)  # [B, 1, S]
            scored, minimum = streaming, self.n_initial + self.n_recent
        else:  # kvpress: the recent window ends n_last entries before the end; lazy layers keep n_recent - n_last
            streaming = ops.protected_mask(valid, self.n_initial, max(0, self.n_recent - self.n_last))
            rank, _ = ops.valid_rank(valid)
            end = n.view(-1, 1, 1) - self.n_last
            scored = valid & ((rank < self.n_initial) | ((rank >= end - self.n_recent) & (rank < end)))
            minimum = self.n_initial + self.n_recent + self.n_last
        score = lazy_scores(ctx, scored, self.n_last)
        long_enough = n > minimum
        lazy = long_enough & (score > self.threshold) & (self.threshold < 1.0)
        keep = torch.where(lazy.view(-1, 1, 1), streaming, valid)
        count = keep.sum(-1).view(-1)
        idx, kept = ops.topk_keep(keep.float(), max(1, int(count.max())), valid=keep, per_row=count)
        total = ctx.budget.total.to(n.device)
        over = int(((count - total).clamp_min(0) * (total < n)).sum())
        ctx.figures.update(lazy=int(lazy.sum()), lazy_score=round(float(score.mean()), 4),
                           entries=round(float(count.float().mean()), 1),
                           achieved_ratio=round(float((count / n.clamp_min(1)).mean()), 4), over_budget=over)
        if over:
            _warn_over_budget(ctx, self.threshold)
        return Selection(indices=idx, kept=kept)
