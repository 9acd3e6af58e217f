"""Adaptive budgets that shrink the cache: AdaKV across the heads of a layer, KVzip-style across layers.

AdaKV (Feng et al., arXiv 2407.11550): a layer's budget ``H x B`` (``B`` entries per KV head under the
uniform budget) is spent on the ``H x B`` highest scores of all its heads together, after a safeguard
floor of ``alpha x B`` entries per head (AdaKV's ``alpha = 0.2``). KVzip (Kim et al., arXiv 2505.23416)
ranks every entry of every layer and head in one top-k; we give each (layer, head) the same kind of floor.

Decisions where the papers are silent or where kvpolicy differs:

* **Real memory.** kvpress (AdaKVPress, KVzip's ``layerwise=False``) masks what it drops; here a layer
  whose heads keep different counts stores each head apart with only its entries
  (:meth:`kvpolicy.cache.KVPolicyLayer.split_heads`), so bytes held equal entries kept (plus the padding
  of shorter rows in a batch).
* **Comparable scores.** Scores are pooled as they are: attention masses (window votes, accumulated
  sums, max attention of a reconstruction) share one scale across heads and layers, so no normalisation is
  applied; scorers that do not (key norms, random, recency) are refused when the policy is built.
* **Protected entries.** Sinks, the recent window and SnapKV's window rank first in every head (they
  count against the head's share and its floor); a prior (LOOK-M's text prior) ranks before the score.
* **Across layers, in two stages.** During the prefill each layer keeps, per head, the best
  ``stage_cap x B`` entries (a superset of what the pooled top-k can keep of that head, unless the head
  needs more) with their scores; after the last layer the cache pools every layer and prunes each to its
  counts. Peak memory: the one full layer being computed plus ``stage_cap x`` the budget for the others
  (``stage_cap: all`` keeps every entry until the pool: exact, full-cache peak, the right choice when a
  reconstruction pass holds the full cache anyway). The layer schedule (e.g. ``pyramid``) sets each
  layer's share of the pool and so its floors: it acts as a prior over layers.
* **Merges.** A merger runs on each layer's first-stage selection; entries the pool prunes later are
  evicted, not merged (use ``scope: heads`` with merging methods).
* **Decoding.** A rolling decode rule compacts one layer at a time: with ``scope: heads`` it reallocates
  over that layer's heads; ``scope: layers`` is refused with a compacting rule (no pooled view while
  decoding).
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor

from kvpolicy import ops
from kvpolicy.allocate import allocate
from kvpolicy.policy import CompressionContext, Selection, Selector

PRIORITY_SCALE = float(2**24)  # above any score the built-in scorers give (SnapKV's window: < 2**24)


def allocation_key(scores: Tensor, forced: Tensor, priority: Tensor | None) -> Tensor:
    """fp64 ranking key ``[B, H, S]``: forced entries ``+inf``, then ``priority``, then the score."""
    key = scores.double()
    if priority is not None:
        key = priority.double() * PRIORITY_SCALE + key.clamp(max=PRIORITY_SCALE - 1)
    return torch.where(forced, float("inf"), key)


class Adaptive(Selector):
    """Spend the budget where the scores are: over the heads of a layer (AdaKV) or over every head of
    every layer (KVzip), each head keeping at least ``floor`` of its uniform share."""

    name: ClassVar[str] = "adaptive"
    paper: ClassVar[str] = "Ada-KV, Feng et al. 2024, arXiv:2407.11550"
    promises: ClassVar[frozenset[str]] = frozenset({"protected", "layer_total", "floor"})
    needs_comparable: ClassVar[bool] = True
    scope: Literal["heads", "layers"] = Field(
        default="heads", description="heads: pool the KV heads of each layer (AdaKV); layers: pool every head "
                                     "of every layer after the prefill (KVzip)")
    floor: float = Field(default=0.2, ge=0.0, le=1.0,
                         description="share of its uniform per-head budget every head keeps at least")
    stage_cap: Annotated[float, Field(ge=1.0)] | Literal["all"] = Field(
        default=3.0, description="scope layers: per-head first-stage superset, in uniform budgets ('all': keep "
                                 "every entry until the pool)")

    def select(self, ctx: CompressionContext, scores: Tensor, priority: Tensor | None) -> Selection:
        hs = scores.shape[1]
        valid = ctx.valid[:, :hs] if hs == 1 else ctx.valid
        forced = ops.protected_mask(valid, ctx.budget.sink, ctx.budget.recent)
        key = allocation_key(scores, forced, priority)
        per_head = ctx.budget.total.to(scores.device)  # [B]
        n_valid = valid.sum(-1)  # [B, hs]
        if self.scope == "layers" and ctx.phase == "prefill":
            cap = n_valid if self.stage_cap == "all" else (per_head.double() * self.stage_cap).ceil().long()[:, None]
            counts = torch.minimum(n_valid, cap.expand_as(n_valid))
        else:
            floor = self.floors(per_head, forced.sum(-1), hs)
            counts = allocate(key, valid, per_head * hs, floor)
        idx, kept = ops.topk_keep(key, max(1, int(counts.max())), valid=valid, per_row=counts)
        return Selection(indices=idx, kept=kept, key=key.gather(-1, idx))

    def floors(self, share: Tensor, forced: Tensor, heads: int) -> Tensor:
        """Least count per head ``[B, heads]``: ``floor x share`` (``share [B]`` or ``[B, heads]``), never
        fewer than its protected entries ``forced [B, heads]`` nor than one entry (no head goes empty)."""
        share = share if share.dim() == 2 else share[:, None].expand(-1, heads)
        least = torch.maximum((share.double() * self.floor).floor().long(), forced.clamp_min(1))
        return torch.minimum(least, share)

    def spans_layers(self) -> bool:
        return self.scope == "layers"

    def pool_counts(self, keys: Tensor, valid: Tensor, share: Tensor) -> Tensor:
        forced = ((keys == float("inf")) & valid).sum(-1)
        return allocate(keys, valid, share.sum(-1), self.floors(share, forced, keys.shape[1]))

