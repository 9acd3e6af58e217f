"""Mass-preserving merges: an entry that stands for ``n`` tokens keeps their attention mass.

Eviction forgets a token; averaging it into a kept entry (LOOK-M) distorts the kept entry and still loses
the token's share of the softmax. Here every merged entry carries a *multiplicity* ``n`` (tokens it stands
for, tracked by the cache through repeated compressions and decoding) and an additive logit bias that
the kvpolicy attention function applies on every later forward:

* ``mass="count"``: ``bias = log n`` (proportional attention, as in token merging). ``n`` identical
  keys/values merged into one entry give exactly the attention output of the ``n`` separate entries.
* ``mass="weight"``: ``bias = bias_c + log((w_c + sum_e w_e) / w_c)`` with ``w`` the folding weights (the
  attention each entry received, for ``weights="attention"``): the merged entry receives the attention
  mass its whole cluster received so far.
* ``mass="none"``: no bias (plain weighted merge, for comparison).

Assignment: each evicted entry ``e`` goes to its most key-cosine-similar kept entry ``a(e)`` of the same
head (chunked, :func:`kvpolicy.ops.cosine_argmax`), and is merged only if ``sigma(e) = cos(k_e, k_a(e))``
passes the threshold (a global ``threshold`` and/or a per-head ``quantile`` of the sigmas): others are
dropped, as eviction would. Folding, per kept ``c`` with assigned set ``E_c``::

    v_c' = (w_c v_c + sum_e w_e v_e) / (w_c + sum_e w_e)          (values, always)
    k_c' = k_c  (keys="keep", value-only merge)   or the same weighted mean (keys="mean")
    n_c' = n_c + sum_e n_e

with ``w`` = multiplicity (``weights="count"``), the accumulated attention of the prefill/decode queries
(``"attention"``), the scorer's scores clamped at 0 (``"score"``, e.g. reconstruction attention), or the
multiplicity times ``max(sigma, 0)`` for evicted entries (``"similarity"``).

:class:`MassPivotal` is LOOK-M's P-Merge (reusing the LOOK-M plugin's functions) with the ``log n`` bias
and multiplicity tracking added, optionally value-only.

Shapes: keys/values ``[B, Hkv, S, D]``, per-entry tensors ``[B, Hkv, S]``; fp32 weights and similarities.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor

from kvpolicy import ops
from kvpolicy.errors import ConfigError
from kvpolicy.policy import CompressionContext, Merged, Merger, Selection, evicted_indices, gather_kept

Weights = Literal["count", "attention", "score", "similarity"]
Mass = Literal["count", "weight", "none"]
WEIGHT_EPS = 1e-6


def entry_multiplicity(ctx: CompressionContext) -> Tensor:
    """``[B, Hkv, S]`` fp32 tokens each entry stands for (1 for entries never merged)."""
    if ctx.multiplicity is not None:
        return ctx.multiplicity.float()
    return torch.ones(ctx.shape, dtype=torch.float32, device=ctx.keys.device)


def entry_bias(ctx: CompressionContext) -> Tensor:
    """``[B, Hkv, S]`` fp32 attention bias of each entry now (0 for invalid entries and unbiased ones)."""
    if ctx.key_bias is None:
        return torch.zeros(ctx.shape, dtype=torch.float32, device=ctx.keys.device)
    return torch.where(ctx.valid, ctx.key_bias.float(), 0.0)


def entry_weights(ctx: CompressionContext, scores: Tensor, weights: Weights) -> Tensor:
    """Folding weight of every entry, ``[B, Hkv, S]`` fp32 (the similarity factor is applied later)."""
    if weights in ("count", "similarity"):
        return entry_multiplicity(ctx)
    if weights == "attention":
        try:
            w = ctx.computed_accumulated()  # the scorer's statistic (exact or its strided estimate)
        except ConfigError as err:
            raise ConfigError(f"merger weights='attention' needs the queries of this event ({err}); use "
                              f"weights='score' or 'count' with this scorer") from None
        return w.float().clamp_min(0)
    if weights == "score":
        s = scores.float().expand(ctx.shape)
        return torch.where(torch.isfinite(s), s, 0.0).clamp_min(0)
    raise ConfigError(f"unknown merge weights {weights!r}; allowed: 'count', 'attention', 'score', 'similarity'")


def merge_filter(sigma: Tensor, valid: Tensor, threshold: float, quantile: float | None) -> Tensor:
    """Which evicted entries are merged, ``[B, H, E]`` bool: valid, ``sigma >= threshold`` and, with
    ``quantile``, ``sigma`` at least the per-head ``quantile`` of the valid sigmas (per-head thresholds)."""
    use = valid & (sigma >= threshold)
    if quantile is not None and valid.shape[-1] > 0:
        s = torch.where(valid, sigma, float("nan"))
        thr = torch.nanquantile(s.float(), quantile, dim=-1, keepdim=True)  # [B, H, 1]
        use = use & (sigma >= torch.nan_to_num(thr, nan=float("inf")))
    return use


def fold(kept: Tensor, src: Tensor, assign: Tensor, w_kept: Tensor, w_src: Tensor, use: Tensor) -> Tensor:
    """Weighted mean ``(w_c u_c + sum_e w_e u_e) / (w_c + sum_e w_e)`` per kept slot, in fp32.

    ``kept [B, H, K, D]``, ``src [B, H, E, D]``, ``assign [B, H, E]`` into ``K``, ``w_kept [B, H, K]``,
    ``w_src [B, H, E]``, ``use [B, H, E]`` bool. Slots receiving nothing are returned unchanged.
    """
    w_src = torch.where(use, w_src, 0.0)
    total = w_kept.clone().scatter_add_(2, assign, w_src)
    return ops.scatter_mean(kept, src, assign, src_weight=w_src, self_weight=w_kept, normalize=total,
                            src_valid=use)


class MassMerge(Merger):
    """Mass-preserving merge: evicted entries fold into their nearest kept key, which gets +log n."""

    name: ClassVar[str] = "mass"
    paper: ClassVar[str] = "kvpolicy's own (docs/methods/beyond.md)"
    keys: Literal["keep", "mean"] = Field(
        default="keep", description="keep survivors' keys (value-only merge) or fold keys like values")
    weights: Weights = Field(default="attention", description="folding weight of each entry: count "
                             "(multiplicity), attention (accumulated), score (the scorer's), similarity")
    mass: Mass = Field(default="count", description="logit bias of merged entries: count (log n), weight "
                       "(log of the cluster's weight over the survivor's), none")
    threshold: float = Field(default=-1.0, ge=-1.0, le=1.0,
                             description="merge an evicted entry only if its best key cosine >= this; else drop")
    quantile: float | None = Field(default=None, ge=0.0, le=1.0, description="per-head threshold: merge only "
                                   "evicted entries whose cosine is >= this quantile of the head's cosines")

    def merge(self, ctx: CompressionContext, selection: Selection, scores: Tensor) -> Merged:
        kept_k, kept_v = gather_kept(ctx, selection)  # [B, Hkv, K, D]
        h = kept_k.shape[1]
        kept_valid = ops.expand_heads(selection.kept, h)
        idx = ops.expand_heads(selection.indices, h)
        ev_idx, ev_valid = evicted_indices(ctx, selection)  # [B, Hkv, E]
        mult = entry_multiplicity(ctx)
        bias = entry_bias(ctx)
        n_kept = torch.where(kept_valid, ops.gather_seq(mult, idx), 1.0)
        b_kept = torch.where(kept_valid, ops.gather_seq(bias, idx), 0.0)
        if ev_idx.shape[2] == 0 or not bool(kept_valid.any()):
            return Merged(keys=kept_k, values=kept_v, multiplicity=n_kept, bias=b_kept)
        ev_k = ops.gather_seq(ctx.keys, ev_idx)
        assign, sigma = ops.cosine_argmax(ev_k, kept_k, dst_valid=kept_valid)
        assign = assign.clamp(0, kept_k.shape[2] - 1)
        use = merge_filter(sigma, ev_valid, self.threshold, self.quantile)
        use = use & kept_valid.gather(2, assign)  # rows without any valid target merge nothing
        w = entry_weights(ctx, scores, self.weights) + WEIGHT_EPS
        w_kept = torch.where(kept_valid, ops.gather_seq(w, idx), 1.0)
        w_ev = ops.gather_seq(w, ev_idx)
        if self.weights == "similarity":
            w_ev = w_ev * sigma.clamp_min(0) + WEIGHT_EPS
        values = fold(kept_v, ops.gather_seq(ctx.values, ev_idx), assign, w_kept, w_ev, use)
        keys = kept_k if self.keys == "keep" else fold(kept_k, ev_k, assign, w_kept, w_ev, use)
        n_new = n_kept.scatter_add(2, assign, torch.where(use, ops.gather_seq(mult, ev_idx), 0.0))
        if self.mass == "count":
            new_bias = n_new.log()
        elif self.mass == "weight":
            gained = torch.zeros_like(w_kept).scatter_add_(2, assign, torch.where(use, w_ev, 0.0))
            new_bias = b_kept + torch.log1p(gained / w_kept)
        else:
            new_bias = b_kept
        n_used = int(use.sum())
        ctx.figures["merge_rule"] = f"mass-{self.weights}-{self.mass}-{self.keys}"
        ctx.figures["merge_filtered"] = round((int(ev_valid.sum()) - n_used) / h)
        if n_used:
            ctx.figures["merge_cos_mean"] = float(sigma[use].mean())
        return Merged(keys=keys, values=values, merged=round(n_used / h), multiplicity=n_new,
                      bias=torch.where(kept_valid, new_bias, 0.0))


class MassPivotal(Merger):
    """LOOK-M P-Merge with mass preservation: pivotal fold, multiplicities tracked, +log n logit bias."""

    name: ClassVar[str] = "mass-pivotal"
    paper: ClassVar[str] = "kvpolicy's own (docs/methods/beyond.md)"
    keys: Literal["merge", "keep"] = Field(default="merge", description="fold keys as P-Merge does, or keep "
                                           "survivors' keys (value-only)")
    filter: Literal["none", "head", "slot"] = Field(default="none", description="LOOK-M similarity filter")
    mass: bool = Field(default=True, description="add log n to merged entries' logits")

    def merge(self, ctx: CompressionContext, selection: Selection, scores: Tensor) -> Merged:
        from kvpolicy_lookm.lookm import lookm_merge

        kept_k, kept_v = gather_kept(ctx, selection)
        h = kept_k.shape[1]
        kept_valid = ops.expand_heads(selection.kept, h)
        idx = ops.expand_heads(selection.indices, h)
        ev_idx, ev_valid = evicted_indices(ctx, selection)
        mult = entry_multiplicity(ctx)
        res = lookm_merge(kept_k, kept_v, ops.gather_seq(ctx.keys, ev_idx), ops.gather_seq(ctx.values, ev_idx),
                          kept_valid=kept_valid, ev_valid=ev_valid, rule="pivotal", filter_mode=self.filter)
        n_kept = torch.where(kept_valid, ops.gather_seq(mult, idx), 1.0)
        use = res.merged & kept_valid.gather(2, res.assign) if ev_idx.shape[2] else res.merged
        n_new = n_kept.scatter_add(2, res.assign, torch.where(use, ops.gather_seq(mult, ev_idx), 0.0))
        bias = torch.where(kept_valid, n_new.log(), 0.0) if self.mass else None
        n_used = int(use.sum())
        ctx.figures["merge_rule"] = "mass-pivotal" if self.mass else "pivotal"
        return Merged(keys=kept_k if self.keys == "keep" else res.keys, values=res.values,
                      merged=round(n_used / h), multiplicity=n_new, bias=bias)
