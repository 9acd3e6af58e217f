"""Elastic Cache (arXiv 2407.18121, ECCV 2024): importance-driven anchors, bucket merge, fixed-point elimination.

Prefill ("instruction encoding"), per layer, one decision shared by all KV heads:

1. importance ``I_n = mean_h sum_m A[h, m, n]`` (head-averaged accumulated attention, fp32);
2. candidates are the valid entries of rank ``[s, N - 1)``: the first ``s`` (sinks) and the last prompt
   entry are neither anchors nor merged and stay bit-identical (a budget ``recent`` window larger than
   one entry, absent from the paper, widens that protected tail);
3. the cache keeps ``K = T - F`` entries with ``F = int(T - T * gamma)`` (the method's own rounding, i.e.
   ``ceil(gamma T)`` up to float error; ``T`` = valid tokens seen by the row, ``gamma`` = budget ratio; a
   token budget ``B`` gives ``K = B``), so ``K - s - 1`` candidates with the highest importance become
   anchors (ties to the lower position);
4. every other candidate is merged into its positionally nearest anchor (ties to the earlier anchor), the
   anchor becoming the uniform mean of itself and its bucket (scatter-mean with self), per head, for keys
   and values. Rows with ``F <= 1`` are left unchanged (as the reference code).

Decoding ("output generation", decode rule ``fixed-point``): ``p* = (T - F) + distance`` (``distance < 0``,
default ``-25``) or ``p* = distance`` (``distance >= 0``), fixed at prefill and clamped into ``[s, len)``;
before each new token is appended, if ``int(len - n_seen * gamma) >= 1`` the entry at physical index
``p*`` is deleted from every head. The reference code deletes right after the step's forward; doing it
at the start of the next step is equivalent (the token of that step has attended to the entry either
way). Entries before ``p*`` never change; ``[p*, end)`` behaves as a FIFO of recent tokens.

Decisions (ALGORITHMS.md D5):

* anchors are the top-importance candidates (paper intent). ``compat: true`` reproduces the reference
  code instead: its rank/index mix-up (a candidate ``r`` is kept iff ``argsort(I)[r] > F``) and its
  off-by-one (``T - F - 1`` entries); ``p*`` still uses the nominal ``T - F``, as that code does. The
  code's other slip (merged sources indexed without the ``+s`` offset) is not reproduced: it merges
  tokens that are not the evicted ones, which is a plain bug, not a behaviour worth a switch;
* ``s`` is the budget's ``sink`` (the preset uses 1, as the evaluation scripts; the class default is 4);
* positions: kvpolicy gives new tokens their true positions (D1); the code's re-indexed positions are
  not offered;
* batches: each row is compressed on its own; its kept entries are right-aligned after its filler slots
  (``fill``, tracked by the decode rule), so its ``p*`` is ``fill + (T - F) + distance``. While decoding,
  each row follows its own rule ``int(len_r - n_seen_r * gamma) >= 1`` (``len_r`` its valid entries,
  ``n_seen_r`` its valid tokens seen): a left-padded batch holds, row by row, exactly what each prompt
  alone would hold. The cache is dense, so when some rows delete and others do not, the others drop one
  of their filler slots (the layer shrinks by one) or, if one of them has none, the deleting rows drop
  ``p*`` and take a filler slot in front instead (``KeepIndices.kept``; the layer keeps its length, which
  is always that of the fullest row). New tokens are assumed valid in every row (as ``generate`` feeds
  them).
* mass (beyond the paper, presets ``elastic-cache-mass``, ``elastic-cache-vonly``): the bucket mean is
  weighted by the tokens each entry stands for (uniform at the first compression) and every merged anchor
  gets a ``+log n`` attention logit bias (``Merged.multiplicity`` / ``bias``, as LOOK-M's
  ``lookm-pivot-mass``); ``keys: keep`` merges values only (anchors keep their keys).

Shapes: keys/values ``[B, Hkv, S, D]``; per-entry tensors ``[B, 1, S]`` (one decision per layer).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor

from kvpolicy import ops
from kvpolicy.policy import (CompressionContext, DecodeRule, DecodeView, KeepIndices, LayerBudget, Merged, Merger,
                             Scorer, Selection, Selector, evicted_indices, gather_kept)

STATE_KEY = "elastic"  # prefill facts the selector leaves for the decode rule (consumed by on_prefill)
P_STAR_KEY = "fixed_point"  # [B] long physical index deleted while decoding
FILL_KEY = "fixed_point_fill"  # [B] long filler (invalid) slots at the front of each row
PADS_KEY = "fixed_point_pads"  # [B] long positions each row has seen that are not its tokens (left padding)
_FAR = 1 << 40  # a position farther than any real one


# --------------------------------------------------------------------------------------------- functions
def keep_count(seen: Tensor, ratio: float | None, total: Tensor) -> Tensor:
    """Nominal entries ``T - F`` each row keeps, ``[B]`` long.

    Ratio budget: ``F = int(T - T * ratio)`` in float64 (the reference code's truncation). Token budget:
    the layer budget ``total``.
    """
    if ratio is None:
        return total.long()
    t = seen.double()
    return (t - (t - t * ratio).trunc()).long()


def candidates(valid: Tensor, sink: int, recent: Tensor | int = 1) -> tuple[Tensor, Tensor]:
    """Entries that may become anchors or be merged: valid ranks ``[sink, N - max(1, recent))``.

    Args:
        valid: ``[B, 1, S]`` bool; recent: protected tail per row (``[B]`` or an int; at least the last entry).
    Returns:
        ``cand [B, 1, S]`` bool and ``rank [B, 1, S]`` (rank of each entry among the valid ones).
    """
    rank, count = ops.valid_rank(valid)
    tail = torch.as_tensor(recent, device=valid.device).clamp_min(1).reshape(-1, 1, 1)
    return valid & (rank >= sink) & (rank < count.unsqueeze(-1) - tail), rank


def choose_anchors(scores: Tensor, cand: Tensor, rank: Tensor, n_drop: Tensor, sink: int, *,
                   compat: bool = False) -> Tensor:
    """Anchor mask ``[B, 1, S]``: which candidates survive (and receive the merged ones).

    Args:
        scores: ``[B, 1, S]`` fp32 importance.
        cand: ``[B, 1, S]`` candidate mask; rank: valid rank of each entry (candidate index = rank - sink).
        n_drop: ``[B]`` entries to remove (``N - (T - F)``).
        compat: reproduce the reference code's ``argsort(I)[r] > F`` selection (keeps ``n_c - F - 1``).
    """
    b, _, s = scores.shape
    n_c = cand.sum(-1)  # [B, 1]
    ar = torch.arange(s, device=scores.device).expand(b, 1, s)
    drop = n_drop.to(scores.device).view(b, 1, 1)
    if compat:
        order = torch.sort(torch.where(cand, scores.float(), float("inf")), dim=-1, stable=True).indices
        arg = (rank - sink).gather(-1, order)  # arg[r] = candidate index of the r-th least important
        chosen = (arg > drop) & (ar < n_c.unsqueeze(-1))  # candidate index r is kept iff arg[r] > F
        return cand & chosen.gather(-1, (rank - sink).clamp(0, s - 1))
    order = torch.sort(torch.where(cand, scores.float(), float("-inf")), dim=-1, descending=True,
                       stable=True).indices
    place = torch.empty_like(order).scatter_(-1, order, ar)  # place of each entry in the ranking
    return cand & (place < (n_c.unsqueeze(-1) - drop))


def pack_right(keep: Tensor) -> tuple[Tensor, Tensor]:
    """Dense indices of a keep mask, right-aligned: ``[B, H, S]`` -> ``indices, kept [B, H, K]``.

    Kept entries appear in ascending order at the end of each row; shorter rows start with filler slots
    (``kept`` False, index = slot number).
    """
    s = keep.shape[-1]
    ar = torch.arange(s, device=keep.device)
    srt = torch.sort(torch.where(keep, ar, ar + s), dim=-1).values  # kept first, ascending
    n = keep.sum(-1, keepdim=True)  # [B, H, 1]
    k = int(n.max()) if keep.numel() else 0
    slot = torch.arange(k, device=keep.device).expand(*keep.shape[:2], k)
    j = slot - (k - n)
    kept = j >= 0
    return torch.where(kept, srt.gather(-1, j.clamp_min(0)), slot), kept


def bucket_owner(positions: Tensor, idx: Tensor, anchor_slot: Tensor, ev_idx: Tensor, ev_valid: Tensor
                 ) -> tuple[Tensor, Tensor]:
    """Kept slot ``[B, Hs, E]`` of the positionally nearest anchor of every evicted entry (ties to the
    earlier anchor), and ``used [B, Hs, E]`` (real sources in rows that have an anchor). Arguments as
    :func:`bucket_merge`."""
    apos = torch.where(anchor_slot, positions.gather(-1, idx), _FAR)
    apos, slot_of = torch.sort(apos, dim=-1)  # anchors first, ascending
    near = ops.nearest_anchor(apos, positions.gather(-1, ev_idx))  # ties -> earlier anchor
    return slot_of.gather(-1, near), ev_valid & anchor_slot.any(-1, keepdim=True)


def bucket_merge(keys: Tensor, values: Tensor, positions: Tensor, idx: Tensor, anchor_slot: Tensor,
                 ev_idx: Tensor, ev_valid: Tensor, *, weights: Tensor | None = None, keep_keys: bool = False
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """Fold every evicted entry into its positionally nearest anchor (uniform scatter-mean with self).

    Args:
        keys, values: ``[B, Hkv, S, D]``; positions: ``[B, Hs, S]`` long (``Hs`` = 1 for a layer-shared
            selection, else Hkv; likewise below).
        idx: ``[B, Hs, K]`` kept slots; anchor_slot: ``[B, Hs, K]`` bool, slots that may receive.
        ev_idx, ev_valid: ``[B, Hs, E]`` evicted entries and which of them are real.
        weights: ``[B, Hkv, S]`` fp32 weight of each entry (the tokens it stands for) for a weighted
            mean, :func:`kvpolicy_beyond.merge.fold`; None: the paper's uniform mean.
        keep_keys: anchors keep their own keys (a value-only merge).
    Returns:
        merged keys and values of the kept slots ``[B, Hkv, K, D]`` and ``used [B, Hs, E]`` (sources folded;
        a row without any anchor folds nothing).
    """
    owner, used = bucket_owner(positions, idx, anchor_slot, ev_idx, ev_valid)
    k, v = bucket_fold(keys, values, idx, ev_idx, owner, used, weights=weights, keep_keys=keep_keys)
    return k, v, used


def bucket_fold(keys: Tensor, values: Tensor, idx: Tensor, ev_idx: Tensor, owner: Tensor, used: Tensor, *,
                weights: Tensor | None = None, keep_keys: bool = False) -> tuple[Tensor, Tensor]:
    """The fold of :func:`bucket_merge` for owners from :func:`bucket_owner`."""
    h = keys.shape[1]
    owner, use_h = ops.expand_heads(owner, h), ops.expand_heads(used, h)
    if weights is None:
        def fold(x: Tensor) -> Tensor:
            return ops.scatter_mean(ops.gather_seq(x, idx), ops.gather_seq(x, ev_idx), owner, src_valid=use_h)
    else:
        from kvpolicy_beyond.merge import fold as weighted_fold

        w_kept, w_ev = ops.gather_seq(weights, idx), ops.gather_seq(weights, ev_idx)

        def fold(x: Tensor) -> Tensor:
            return weighted_fold(ops.gather_seq(x, idx), ops.gather_seq(x, ev_idx), owner, w_kept, w_ev, use_h)
    k = ops.gather_seq(keys, idx) if keep_keys else fold(keys)
    return k, fold(values)


# --------------------------------------------------------------------------------------------- steps
class ElasticImportance(Scorer):
    """Elastic Cache importance: accumulated attention averaged over heads (one score per layer).

    ``query_stride: s > 1`` estimates it from every ``s``-th prefill query (as ``accumulated-attention``);
    ``1`` (default, the paper) is exact.
    """

    name: ClassVar[str] = "elastic-importance"
    paper: ClassVar[str] = "Elastic Cache, Liu et al., ECCV 2024, arXiv:2407.18121"
    observations: ClassVar[frozenset[str]] = frozenset({"accumulated_attention"})
    query_stride: int = Field(default=1, ge=1, le=4096,
                              description="estimate from every s-th prefill query (1 = exact)")

    def score(self, ctx: CompressionContext) -> Tensor:
        return ctx.accumulated_attention(self.query_stride).mean(1, keepdim=True)  # [B, 1, S]


class ElasticAnchors(Selector):
    """Elastic Cache anchors: sinks + top-importance candidates + last entry, ``T - F`` entries per row."""

    name: ClassVar[str] = "elastic-anchors"
    paper: ClassVar[str] = "Elastic Cache, Liu et al., ECCV 2024, arXiv:2407.18121"
    compat: bool = Field(default=False, description="reproduce the reference code's rank/index mix-up and "
                                                    "its off-by-one (T - F - 1 entries)")

    def select(self, ctx: CompressionContext, scores: Tensor, priority: Tensor | None) -> Selection:
        valid = ctx.valid[:, :1]
        sc = scores.float().mean(1, keepdim=True) if scores.shape[1] != 1 else scores.float()
        b = ctx.shape[0]
        sink = ctx.budget.sink
        n_valid = valid.sum(-1).view(b).cpu()
        seen = ctx.budget.seen if ctx.budget.seen is not None else n_valid
        nominal = keep_count(seen.cpu(), ctx.budget.ratio, ctx.budget.total.cpu())
        n_drop = (n_valid - nominal).clamp_min(0)
        cand, rank = candidates(valid, sink, ctx.budget.recent)
        anchors = choose_anchors(sc, cand, rank, n_drop, sink, compat=self.compat)
        compressing = (n_drop > 1).to(valid.device).view(b, 1, 1)  # the code merges only when F > 1
        keep = torch.where(compressing, valid & (~cand | anchors), valid)
        idx, kept = pack_right(keep)
        ctx.state[STATE_KEY] = {"fill": (idx.shape[-1] - keep.sum(-1)).view(b).cpu(), "nominal": nominal,
                                "device": ctx.keys.device}
        ctx.figures["anchors"] = int((anchors & compressing).sum())
        return Selection(indices=idx, kept=kept)


class ElasticBucket(Merger):
    """Elastic Cache merge: each evicted candidate is averaged into its positionally nearest anchor."""

    name: ClassVar[str] = "elastic-bucket"
    paper: ClassVar[str] = "Elastic Cache, Liu et al., ECCV 2024, arXiv:2407.18121"
    promises: ClassVar[frozenset[str]] = frozenset({"convex", "identity_on_equal"})
    keys: Literal["merge", "keep"] = Field(default="merge", description="average keys like values (paper), "
                                           "or keep the anchors' keys (value-only merge)")
    mass: bool = Field(default=False, description="track the tokens each entry stands for: multiplicity-"
                       "weighted bucket mean and a +log n attention logit bias on merged entries")

    def merge(self, ctx: CompressionContext, selection: Selection, scores: Tensor) -> Merged:
        b, hs, _ = selection.indices.shape  # hs = 1 (layer-shared, as elastic-anchors) or Hkv (per head)
        h = ctx.keys.shape[1]
        cand, _ = candidates(ctx.valid[:, :1], ctx.budget.sink, ctx.budget.recent)
        anchor_slot = selection.kept & cand.expand(b, hs, -1).gather(-1, selection.indices)
        ev_idx, ev_valid = evicted_indices(ctx, selection)
        mult = None
        if self.mass:
            from kvpolicy_beyond.merge import entry_multiplicity

            mult = entry_multiplicity(ctx)
            kept_h = ops.expand_heads(selection.kept, h)
            n_kept = torch.where(kept_h, ops.gather_seq(mult, selection.indices), 1.0)
        if ev_idx.shape[-1] == 0:
            k, v = gather_kept(ctx, selection)
            if mult is None:
                return Merged(keys=k, values=v)
            return Merged(keys=k, values=v, multiplicity=n_kept, bias=torch.where(kept_h, n_kept.log(), 0.0))
        owner, used = bucket_owner(ctx.positions[:, :hs], selection.indices, anchor_slot, ev_idx[:, :hs],
                                   ev_valid[:, :hs])
        k, v = bucket_fold(ctx.keys, ctx.values, selection.indices, ev_idx[:, :hs], owner, used, weights=mult,
                           keep_keys=self.keys == "keep")
        folded = round(int(used.sum()) / hs)
        if mult is None:
            return Merged(keys=k, values=v, merged=folded)
        use_h = ops.expand_heads(used, h)
        n_new = n_kept.scatter_add(2, ops.expand_heads(owner, h),
                                   torch.where(use_h, ops.gather_seq(mult, ev_idx[:, :hs]), 0.0))
        return Merged(keys=k, values=v, merged=folded, multiplicity=n_new,
                      bias=torch.where(kept_h, n_new.log(), 0.0))


def fixed_point(length: int, n_seen: int, budget: LayerBudget | None, target: int) -> bool:
    """Whether the fixed-point rule deletes an entry now: ``int(len - n_seen * gamma) >= 1``.

    A token budget (no ratio) deletes whenever the layer holds more than ``target`` entries.
    """
    if budget is not None and budget.ratio is not None:
        return int(length - n_seen * budget.ratio) >= 1
    return length > target


def fixed_point_rows(entries: Tensor, n_seen: Tensor, ratio: float | None, total: Tensor) -> Tensor:
    """:func:`fixed_point` per row: ``[B]`` bool, ``int(entries - n_seen * gamma) >= 1`` for a ratio budget
    (``entries``, ``n_seen`` ``[B]``: the row's valid entries and valid tokens seen), else ``entries > total``.
    """
    if ratio is not None:  # int(x) >= 1 iff x >= 1; float64 as Python's int(len - n_seen * gamma)
        return entries.double() - n_seen.double() * ratio >= 1
    return entries > total.to(entries.device)


class FixedPoint(DecodeRule):
    """Elastic Cache fixed-point elimination: keep ``len ~ gamma * n_seen`` by deleting index ``p*``."""

    name: ClassVar[str] = "fixed-point"
    paper: ClassVar[str] = "Elastic Cache, Liu et al., ECCV 2024, arXiv:2407.18121"
    distance: int = Field(default=-25, description="p* = (T - F) + distance if negative, else p* = distance")

    def on_prefill(self, view: DecodeView) -> None:
        info = view.state.pop(STATE_KEY, None)
        seen = view.budget.seen if view.budget is not None else None
        b = int(seen.numel()) if seen is not None else 1
        sink = view.budget.sink if view.budget is not None else 0
        # positions the row has seen that are not its tokens (left padding): n_seen - seen, fixed from now on
        pads = (view.n_seen - seen.long().cpu()).clamp_min(0) if seen is not None else torch.zeros(b, dtype=torch.long)
        if info is None:  # the layer was not compressed: pads (and earlier fillers) at the front, end = nominal end
            old_fill, old_pads = view.state.get(FILL_KEY), view.state.get(PADS_KEY)
            fill = pads.clone() if old_fill is None or old_fill.numel() != b else (
                old_fill.cpu() + pads - old_pads.cpu())
            fill = fill.clamp(0, view.length)
            nominal = view.length - fill
            device = old_fill.device if old_fill is not None else None
        else:
            fill, nominal, device = info["fill"], info["nominal"], info["device"]
        p = fill + (nominal + self.distance if self.distance < 0 else self.distance)
        p = torch.minimum(torch.maximum(p, fill + sink), torch.full_like(p, max(view.length - 1, 0)))
        for key, t in ((P_STAR_KEY, p), (FILL_KEY, fill), (PADS_KEY, pads)):
            view.state[key] = t.to(device) if device is not None else t

    def on_decode(self, view: DecodeView) -> KeepIndices | None:
        p = view.state.get(P_STAR_KEY)
        if p is None or view.length < 2:
            return None
        fill, pads, lb = view.state.get(FILL_KEY), view.state.get(PADS_KEY), view.budget
        if fill is None or pads is None or lb is None or fill.numel() != p.numel():  # no per-row facts
            if not fixed_point(view.length, view.n_seen, lb, view.target):
                return None
            idx = _without(torch.arange(view.length, device=p.device).expand(p.shape[0], view.length),
                           p.clamp_max(view.length - 1))
            return KeepIndices(indices=idx.unsqueeze(1), event="fixed-point")
        n = view.length
        entries = n - fill  # valid entries per row: kept rows are right-aligned after `fill` filler slots
        delete = fixed_point_rows(entries, view.n_seen - pads, lb.ratio, lb.total) & (entries >= 2)
        if not bool(delete.any()):
            return None
        ar = torch.arange(n, device=p.device).expand(p.shape[0], n)
        keep = (~delete).long()
        if bool((delete | (fill >= 1)).all()):  # the layer shrinks: the other rows drop a filler slot
            idx = _without(ar, torch.where(delete, p.clamp_max(n - 1), 0))
            view.state[FILL_KEY], view.state[P_STAR_KEY] = fill - keep, p - keep
            return KeepIndices(indices=idx.unsqueeze(1), event="fixed-point")
        # a row that must not delete has no filler slot to give: the length stays, and each deleting row
        # drops p* and gains a filler slot in front (its kept entries stay right-aligned)
        shifted = torch.cat([ar[:, :1], _without(ar, p.clamp_max(n - 1))], dim=1)
        idx = torch.where(delete.unsqueeze(-1), shifted, ar)
        kept = ~(delete.unsqueeze(-1) & (ar == 0))
        view.state[FILL_KEY], view.state[P_STAR_KEY] = fill + delete.long(), p + delete.long()
        return KeepIndices(indices=idx.unsqueeze(1), kept=kept.unsqueeze(1), event="fixed-point")


def _without(ar: Tensor, drop: Tensor) -> Tensor:
    """``ar [B, n]`` (``arange(n)`` per row) without the index ``drop [B]`` of each row: ``[B, n - 1]``."""
    head = ar[:, :-1]
    return head + (head >= drop.unsqueeze(-1)).long()
