"""LOOK-M (arXiv 2406.18139): text-prior eviction plus merging of the evicted KV pairs.

Per layer, once at the end of the prefill ("look once"), per KV head:

1. Scores: accumulated attention ``s_j = sum_i A_ij`` over all prefill queries (fp32, GQA group mean);
   the ``accumulated-attention`` scorer of the baselines plugin provides it.
2. Budget: recent window ``M = int(a1 L)`` and important part ``N = int(a2 L)``. In kvpolicy terms this
   is ``Budget(ratio=a1 + a2, recent=a1 / (a1 + a2))``, see :func:`lookm_budget` (the window is
   ``floor(floor((a1 + a2) L) * share)``, which can differ from ``int(a1 L)`` by one entry).
3. Text prior (:class:`TextPrior`): every text entry outranks every visual entry. The ranking is
   lexicographic ``(is_text desc, score desc, position asc)`` in fp32, the paper's intent (decision D2);
   the released code adds ``-65516`` to image scores in half precision, which ties almost all image scores
   so that ``topk`` tie-breaking picks the image tokens - not reproduced.
4. Selection (:class:`LookMTopK`): the recent window, then *all* text entries of the candidate part
   ``P`` (even beyond ``N``: paper and code agree), then the best visual entries up to ``N``:
   ``|C| = M + max(N, |T ∩ P|)``. ``cap_priority=True`` caps the text at the budget instead (D2's other
   branch). Without a prior it is plain top-k (``|C| = N + M``).
5. Merging (:class:`Averaged`, :class:`Pivotal`, :class:`Weighted`): each evicted entry ``e`` goes to
   its most key-cosine-similar kept entry ``a(e)`` (``sigma(e)`` = that cosine; ties to the lowest kept
   index; pre-merge post-RoPE keys; values reuse the assignment), then, simultaneously for every kept
   ``c`` receiving ``E_c`` (``n_c = |E_c|``), for ``u`` in ``{k, v}``:

   * averaged (A-Merge): ``u_c' = (u_c + sum_e u_e) / (1 + n_c)``
   * pivotal  (P-Merge): ``u_c' = (u_c + sum_e (u_e + u_c) / 2) / (1 + n_c)``
   * weighted (W-Merge): ``u_c' = (u_c + sum_e sigma(e) u_e) / (1 + n_c)`` (not normalised; paper = code)

   A kept entry receiving nothing is bit-identical. Padding and filler slots are never sources or
   targets. The assignment is chunked over evicted entries (:func:`kvpolicy.ops.cosine_argmax`): no
   ``|E| x |C|`` matrix for a whole layer.

Decisions (ALGORITHMS.md section 8):

* D2: lexicographic fp32 prior (default); text may exceed the budget (default) or be capped
  (``lookm-topk`` ``cap_priority=True``).
* D3: similarity filter ``filter="none"`` (paper, default), ``"head"`` (per head:
  ``sigma_h(e) >= mean_e sigma_h(e)``, recommended variant) or ``"slot"`` (the code's head-averaged
  e-th-slot filter, which mixes unrelated tokens of different heads; the code applies it to A/W only).
  Filtered-out entries are dropped unmerged. The code's A-Merge source/target misalignment after
  filtering is a bug and is not reproduced (sources and targets are always paired consistently).
* D4: sinks. The text-prior presets have none (the first positions are system text and are kept by the
  prior); the non-text-prior merge presets force the first 4 positions inside ``N`` as the code does.
  Any preset accepts ``budget={"sink": n}``.
* Text-only input: with no visual entry the prior is a no-op and LOOK-M is one-shot H2O + merge. The
  released code skips compression when the prompt has no image; ``lookm-topk`` ``require_images=True``
  reproduces that (rows without a visual entry are kept whole).
* Batch > 1: decisions are per sample (the code sums scores over the batch and takes image positions
  from the last sample).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor

from kvpolicy import ops
from kvpolicy.policy import CompressionContext, Merged, Merger, Prior, Selection, Selector, evicted_indices

MergeRule = Literal["averaged", "pivotal", "weighted"]
FilterMode = Literal["none", "head", "slot"]


def lookm_budget(a1: float = 0.1, a2: float = 0.1, sink: int = 0) -> dict[str, float | int]:
    """kvpolicy budget mapping for LOOK-M's recent ratio ``a1`` and important ratio ``a2``.

    ``M = int(a1 L)`` recent entries and ``N = int(a2 L)`` important ones become
    ``{"ratio": a1 + a2, "recent": a1 / (a1 + a2), "sink": sink}``.
    """
    if not (a1 >= 0 and a2 >= 0 and 0 < a1 + a2 <= 1):
        raise ValueError(f"LOOK-M ratios a1={a1!r}, a2={a2!r}: allowed a1, a2 >= 0 and 0 < a1 + a2 <= 1")
    return {"ratio": a1 + a2, "recent": a1 / (a1 + a2), "sink": sink}


# --------------------------------------------------------------------------------------------- prior
class TextPrior(Prior):
    """LOOK-M text prior: text entries (priority 1) rank before visual ones (priority 0)."""

    name: ClassVar[str] = "text-prior"
    paper: ClassVar[str] = "LOOK-M, Wan et al., EMNLP 2024 Findings, arXiv:2406.18139"

    def priority(self, ctx: CompressionContext) -> Tensor:
        return (~ctx.is_image[:, :1]).long()  # [B, 1, S]; modality is shared by the heads


# --------------------------------------------------------------------------------------------- selector
class LookMTopK(Selector):
    """Top-k that keeps every prioritised (text) entry even beyond the budget: |C| = M + max(N, |T∩P|).

    Ranking: sinks and the recent window, then priority class, then score, then position. Entries above
    the lowest priority class present in their row are kept even beyond the budget (``cap_priority``
    turns that off); in a row where all entries share one class (text-only input under the text prior)
    this is plain top-k, i.e. LOOK-M on text is one-shot H2O + merge.
    """

    name: ClassVar[str] = "lookm-topk"
    paper: ClassVar[str] = "LOOK-M, Wan et al., EMNLP 2024 Findings, arXiv:2406.18139"
    promises: ClassVar[frozenset[str]] = frozenset({"protected", "nested"})
    cap_priority: bool = Field(default=False, description="cap prioritised entries at the budget (D2 variant) "
                                                         "instead of keeping all of them")
    require_images: bool = Field(default=False, description="keep rows without any visual entry whole, as the "
                                                            "released LOOK-M code does")

    def select(self, ctx: CompressionContext, scores: Tensor, priority: Tensor | None) -> Selection:
        b, hs, s = scores.shape
        valid = ctx.valid[:, :hs] if hs == 1 else ctx.valid
        forced = ops.protected_mask(valid, ctx.budget.sink, ctx.budget.recent)  # sinks + recent window
        total = ctx.budget.total.to(scores.device)
        per_row = total
        if priority is not None and not self.cap_priority:
            forced = forced | _above_lowest_class(priority.expand_as(valid), valid)  # all text of P is kept
            per_row = torch.maximum(total, forced[:, 0].sum(-1))
        if self.require_images:
            has_image = (ctx.is_image[:, 0] & ctx.valid[:, 0]).any(-1)
            per_row = torch.where(has_image, per_row, ctx.valid_count().to(per_row.device))
        ctx.figures["over_budget"] = int((per_row - total).clamp_min(0).sum())
        idx, kept = ops.topk_keep(scores, int(per_row.max()), valid=valid, forced=forced, priority=priority,
                                  per_row=per_row)
        return Selection(indices=idx, kept=kept)


def _above_lowest_class(priority: Tensor, valid: Tensor) -> Tensor:
    """Valid entries ranked above their row's lowest priority class, ``[B, H, S]`` bool.

    Under the text prior: the text entries of rows that hold at least one visual entry. A row whose
    valid entries share one class (text-only input) gets none, so the prior is a no-op there.
    """
    p = priority.float()
    lowest = torch.where(valid, p, float("inf")).amin(-1, keepdim=True)
    return valid & (p > lowest)


# --------------------------------------------------------------------------------------------- merge
@dataclass
class MergeResult:
    """Output of :func:`lookm_merge`: merged kept entries and how the evicted ones were assigned."""

    keys: Tensor  # [B, H, K, D] merged kept keys (dtype of the input)
    values: Tensor  # [B, H, K, D]
    assign: Tensor  # [B, H, E] long, kept slot each evicted entry is assigned to
    sigma: Tensor  # [B, H, E] fp32, cosine to that slot
    merged: Tensor  # [B, H, E] bool, evicted entries actually merged (valid and passing the filter)


def similarity_filter(sigma: Tensor, valid: Tensor, mode: FilterMode) -> Tensor:
    """Which evicted entries are merged (ALGORITHMS 2.9), ``[B, H, E]`` bool.

    ``"none"``: all valid ones. ``"head"``: ``sigma_h(e) >= mean_e sigma_h(e)`` per head. ``"slot"`` (the
    code): slot ``e`` of every head is kept iff ``mean_h sigma_h(e) >= mean_{h,e} sigma_h(e)``.
    """
    if mode == "none":
        return valid
    w = valid.float()
    sig = torch.where(valid, sigma, 0.0)
    if mode == "head":
        thr = sig.sum(-1, keepdim=True) / w.sum(-1, keepdim=True).clamp_min(1)
        return valid & (sigma >= thr)
    if mode == "slot":
        slot = sig.sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp_min(1)  # [B, 1, E]
        thr = sig.sum((1, 2), keepdim=True) / w.sum((1, 2), keepdim=True).clamp_min(1)  # [B, 1, 1]
        return valid & (slot >= thr)
    raise ValueError(f"unknown LOOK-M similarity filter {mode!r}; allowed: 'none', 'head', 'slot'")


def merge_rule(rule: MergeRule, kept: Tensor, evicted: Tensor, assign: Tensor, sigma: Tensor,
               use: Tensor) -> Tensor:
    """Fold ``evicted [B, H, E, D]`` into ``kept [B, H, K, D]`` with one of the three LOOK-M rules.

    ``assign``/``sigma``/``use`` ``[B, H, E]``: target slot, cosine, and whether the entry is merged.
    P-Merge is computed in its expanded form ``((1 + n/2) u_c + sum_e u_e / 2) / (1 + n)``, which needs
    no gather of the targets.
    """
    if rule == "averaged":
        return ops.scatter_mean(kept, evicted, assign, src_valid=use)
    if rule == "pivotal":
        n = torch.zeros(kept.shape[:3], dtype=torch.float32, device=kept.device)
        n = n.scatter_add(2, assign, use.float())
        half = torch.full(assign.shape, 0.5, dtype=torch.float32, device=kept.device)
        return ops.scatter_mean(kept, evicted, assign, src_weight=half, self_weight=1 + n / 2, normalize=1 + n,
                                src_valid=use)
    if rule == "weighted":
        return ops.scatter_mean(kept, evicted, assign, src_weight=sigma, src_valid=use)
    raise ValueError(f"unknown LOOK-M merge rule {rule!r}; allowed: 'averaged', 'pivotal', 'weighted'")


def _merge_joint(kept: Tensor, evicted: Tensor, key_dim: int, kept_valid: Tensor, ev_valid: Tensor,
                 rule: MergeRule, filter_mode: FilterMode) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Merge on keys and values concatenated along the last axis (``[..., :key_dim]`` are the keys).

    One assignment (on the keys) and one scatter serve both. Returns merged, assign, sigma, used.
    """
    if evicted.shape[2] == 0:
        e = torch.zeros(*evicted.shape[:3], dtype=torch.long, device=evicted.device)
        return kept, e, e.float(), e.bool()
    dst_valid = None if bool(kept_valid.all()) else kept_valid  # skips a masking pass over |E| x |K|
    assign, sigma = ops.cosine_argmax(evicted[..., :key_dim], kept[..., :key_dim], dst_valid=dst_valid)
    use = similarity_filter(sigma, ev_valid, filter_mode)
    assign = assign.clamp(0, kept.shape[2] - 1)  # rows without any valid target: nothing is used there
    return merge_rule(rule, kept, evicted, assign, sigma, use), assign, sigma, use


def lookm_merge(kept_keys: Tensor, kept_values: Tensor, ev_keys: Tensor, ev_values: Tensor, *,
                kept_valid: Tensor, ev_valid: Tensor, rule: MergeRule, filter_mode: FilterMode = "none"
                ) -> MergeResult:
    """LOOK-M merge of evicted entries into kept ones (paper Eq. 9-12), per head.

    Args:
        kept_keys, kept_values: ``[B, H, K, D]`` conserved entries.
        ev_keys, ev_values: ``[B, H, E, D]`` evicted entries.
        kept_valid: ``[B, H, K]`` bool (fillers/pads are never targets).
        ev_valid: ``[B, H, E]`` bool (padding slots are never sources).
        rule: ``"averaged"``, ``"pivotal"`` or ``"weighted"``; filter_mode: see :func:`similarity_filter`.
    """
    dk = kept_keys.shape[-1]
    out, assign, sigma, use = _merge_joint(torch.cat([kept_keys, kept_values], -1),
                                           torch.cat([ev_keys, ev_values], -1), dk, kept_valid, ev_valid, rule,
                                           filter_mode)
    return MergeResult(out[..., :dk], out[..., dk:], assign, sigma, use)


class _LookMMerger(Merger):
    rule: ClassVar[MergeRule]
    filter: FilterMode = Field(default="none", description="similarity filter: none (paper), head (per head "
                                                           "sigma >= its mean), slot (released code)")

    @property
    def promises(self) -> frozenset[str]:  # type: ignore[override]
        """A/P-Merge are convex; W-Merge is not (coefficients sum to (1 + sum sigma) / (1 + n)); every
        evicted entry is merged exactly once unless a similarity filter drops some (and W-Merge gives a
        zero weight to an entry of cosine 0)."""
        out = {"identity_on_equal"}
        if self.rule != "weighted":
            out.add("convex")
            if self.filter == "none":
                out.add("assign_once")
        return frozenset(out)

    def merge(self, ctx: CompressionContext, selection: Selection, scores: Tensor) -> Merged:
        dk = ctx.keys.shape[-1]
        kv = torch.cat([ctx.keys, ctx.values], dim=-1)  # [B, Hkv, S, Dk + Dv]: one gather, one scatter
        h = kv.shape[1]
        ev_idx, ev_valid = evicted_indices(ctx, selection)  # [B, Hkv, E]
        out, _, sigma, used = _merge_joint(ops.gather_seq(kv, selection.indices), ops.gather_seq(kv, ev_idx), dk,
                                           ops.expand_heads(selection.kept, h), ev_valid, self.rule, self.filter)
        n_ev = int(ev_valid.sum())
        n_used = int(used.sum())
        ctx.figures["merge_rule"] = self.rule
        ctx.figures["merge_filtered"] = round((n_ev - n_used) / h)
        if n_used:
            ctx.figures["merge_cos_mean"] = float(sigma[used].mean())
        return Merged(keys=out[..., :dk], values=out[..., dk:], merged=round(n_used / h))


class Averaged(_LookMMerger):
    """LOOK-M A-Merge: kept entry = mean of itself and the evicted entries assigned to it."""

    name: ClassVar[str] = "averaged"
    paper: ClassVar[str] = "LOOK-M, Wan et al., EMNLP 2024 Findings, arXiv:2406.18139"
    rule: ClassVar[MergeRule] = "averaged"


class Pivotal(_LookMMerger):
    """LOOK-M P-Merge: kept entry = mean of itself and the pivots (evicted + kept) / 2."""

    name: ClassVar[str] = "pivotal"
    paper: ClassVar[str] = "LOOK-M, Wan et al., EMNLP 2024 Findings, arXiv:2406.18139"
    rule: ClassVar[MergeRule] = "pivotal"


class Weighted(_LookMMerger):
    """LOOK-M W-Merge: evicted entries weighted by their cosine, divided by 1 + n (not normalised)."""

    name: ClassVar[str] = "weighted"
    paper: ClassVar[str] = "LOOK-M, Wan et al., EMNLP 2024 Findings, arXiv:2406.18139"
    rule: ClassVar[MergeRule] = "weighted"
