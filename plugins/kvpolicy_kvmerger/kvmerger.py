"""KVMerger (arXiv 2407.08454): merge runs of adjacent similar keys into their most-attended token.

Prefill only, per layer:

1. scores ``a_j`` = accumulated prefill attention (scorer ``accumulated-attention``, per KV head);
2. protected singletons (kept bit-identical, never merged, they break runs): the budget's sinks, the most
   recent ``int(recent * L)`` valid entries (or the budget's recent window if larger) and the
   ``int(heavy * L)`` non-recent entries of highest head-mean score (heavy hitters); ``L`` = valid
   entries of the row;
3. merging sets: maximal runs of adjacent unprotected valid entries whose adjacent key cosine is above
   ``similarity`` (the paper's backward greedy scan chains neighbour to neighbour, so its sets are exactly
   these runs, whatever the scan direction); singletons allowed;
4. pivot of a set = its entry of highest accumulated attention (per KV head; ties to the earlier
   position); the merged entry takes the pivot's slot (and position);
5. Gaussian-kernel merge, per head: ``g_i = exp(-|k_i - k_p|^2 / (2 sigma^2))``, ``w = g / sum g``,
   ``k' = sum w_i k_i``; values ``v' = |S| sum w_i v_i`` (paper) or variants (``mass``).

All adjacent cosines are O(L) (``[B, Hkv, L - 1]``); sets, pivots and merges are segment reductions with
``scatter``: no ``L x L`` matrix anywhere.

Decisions (ALGORITHMS.md D6-D8):

* D8, granularity: sets are shared by the KV heads of a layer (mean of the per-head adjacent cosines),
  so every head keeps the same number of entries and the cache stays a dense ``[B, Hkv, K, D]`` tensor
  with no per-head padding or masks; pivots (hence the kernel weights and slot positions) remain per head.
  Protection is shared too (heavy hitters by head-mean score).
* D6, budget: ``mode: fixed`` (the paper) uses the fixed threshold and reports the achieved size
  (``ctx.figures`` ``entries`` / ``achieved_ratio``); the budget only decides whether a layer is
  compressed at all, and a layer left above its budget raises a :class:`~kvpolicy.errors.BudgetWarning`
  (once per message) naming the modes that keep within it. ``mode: capped`` (preset ``kvmerger``) merges
  the pairs above the threshold and, where that leaves the layer above its budget, the next most similar
  ones until it fits: the threshold decides the size when it fits the budget, the budget caps it
  otherwise. ``mode: exact`` merges, per row and layer, the ``U - B_u`` most similar joinable adjacent
  pairs (``U`` unprotected entries, ``B_u`` = budget - protected), which yields exactly the budget. In
  both budget modes, a row whose protected entries plus one entry per run of unprotected ones do not fit
  gets its recent and heavy-hitter shares scaled down by one factor (:func:`fit_protection`; the
  budget's own recent window and sinks are kept), so the size is the budget; only sinks filling the
  whole budget leave a layer above it (``figures['over_budget']`` and a warning say so).
  Layers may end with different physical lengths; each layer's mask follows its own metadata.
* D7: ``sigma_mode: constant`` with ``sigma = 5`` (the paper's ablation) by default, ``distance`` for the
  per-set ``sigma = sum |k_i - k_p| / (sqrt(2) |S|)``, both floored at ``1e-6``. ``mass: scaled`` is the
  paper's ``|S|``-scaled value sum; it inflates the output of a merged entry (value weights sum to |S|
  while the softmax still gives the entry one slot). ``mass: mean`` is the plain weighted mean;
  ``mass: bias`` is the weighted mean plus an additive ``log |S|`` attention logit bias on the merged
  entry (``Merged.bias`` / ``multiplicity``), i.e. the entry counts as ``|S|`` copies of its key in both
  the numerator and the denominator of the softmax. ``recent`` and ``heavy`` are fractions.
* No decode-time merging (the paper describes none); ``skip_edge_layers`` leaves layers 0, 1 and the
  last one uncompressed (the paper finds little mergeable redundancy there).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor

from kvpolicy import ops
from kvpolicy.errors import BudgetWarning
from kvpolicy.policy import CompressionContext, Merged, Merger, Selection, Selector

SIGMA_MIN = 1e-6
_FAR = 1 << 40  # a position farther than any real one


@dataclass
class MergeSets(Selection):
    """A selection whose kept slots stand for runs of entries.

    ``indices [B, Hs, K]`` are the pivots (``Hs`` = KV heads, or 1), ``owner [B, 1 or Hs, S]`` the slot each
    entry folds into (``K`` for invalid entries), ``size [B, 1 or Hs, K]`` the entries per slot (0 for fillers).
    """

    owner: Tensor
    size: Tensor


# --------------------------------------------------------------------------------------------- functions
def adjacent_cosine(keys: Tensor) -> Tensor:
    """Cosine of each key with the next one, averaged over KV heads: ``[B, Hkv, S, D] -> [B, 1, S - 1]`` fp32.

    ``cos(x, y) = x.y / max(|x| |y|, eps)``.
    """
    k = keys.float()
    dot = (k[:, :, :-1] * k[:, :, 1:]).sum(-1)
    norm = k.norm(dim=-1)
    cos = dot / (norm[:, :, :-1] * norm[:, :, 1:]).clamp_min(ops.COS_EPS)
    return cos.mean(1, keepdim=True)


def _fraction(n: Tensor, share: float) -> Tensor:
    return (n.double() * share).floor().long()


def protected_entries(valid: Tensor, scores: Tensor, *, sink: int, recent: Tensor, heavy: Tensor) -> Tensor:
    """Protected mask ``[B, 1, S]``: sinks, the last ``recent`` ``[B]`` and the ``heavy`` ``[B]`` best others.

    Args:
        valid: ``[B, 1, S]`` bool; scores: ``[B, 1, S]`` fp32 (head-mean accumulated attention).
    """
    base = ops.protected_mask(valid, sink, recent)
    b, _, s = valid.shape
    key = torch.where(valid & ~base, scores.float(), float("-inf"))
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices  # ties -> lower position
    place = torch.empty_like(order).scatter_(-1, order, torch.arange(s, device=valid.device).expand(b, 1, s))
    return base | (valid & ~base & (place < heavy.to(valid.device).view(b, 1, 1)))


def exact_joins(cos: Tensor, joinable: Tensor, n_join: Tensor) -> Tensor:
    """The ``n_join`` ``[B]`` most similar joinable adjacent pairs per row (ties to the lower position)."""
    b, _, m = cos.shape
    order = torch.sort(torch.where(joinable, cos, float("-inf")), dim=-1, descending=True, stable=True).indices
    place = torch.empty_like(order).scatter_(-1, order, torch.arange(m, device=cos.device).expand(b, 1, m))
    return joinable & (place < n_join.to(cos.device).view(b, 1, 1))


def merging_sets(valid: Tensor, join: Tensor, scores: Tensor) -> MergeSets:
    """Turn pair joins into sets, right-aligned slots and per-head pivots.

    Args:
        valid: ``[B, 1, S]`` bool; join: ``[B, 1, S - 1]`` bool, entry ``j`` and ``j + 1`` share a set;
        scores: ``[B, Hs, S]`` fp32, the pivot of a set is its highest-scoring entry (ties -> earlier).
    """
    b, _, s = valid.shape
    hs = scores.shape[1]
    dev = valid.device
    joined_prev = torch.zeros_like(valid)
    joined_prev[..., 1:] = join
    start = valid & ~joined_prev
    n_sets = start.sum(-1, keepdim=True)  # [B, 1, 1]
    k = int(n_sets.max()) if valid.numel() else 0
    slot = start.long().cumsum(-1) - 1 + (k - n_sets)  # right-aligned: fillers first
    owner = torch.where(valid, slot, k)  # invalid entries go to a dump slot k
    size = torch.zeros(b, 1, k + 1, device=dev).scatter_add_(-1, owner, valid.float())[..., :k]
    own_h = owner.expand(b, hs, s)
    sc = torch.where(valid, scores.float(), float("-inf"))
    best = torch.full((b, hs, k + 1), float("-inf"), device=dev).scatter_reduce(-1, own_h, sc, "amax")
    ar = torch.arange(s, device=dev).expand(b, hs, s)
    is_best = valid & (sc == best.gather(-1, own_h))
    first = torch.full((b, hs, k + 1), s, device=dev, dtype=torch.long).scatter_reduce(
        -1, own_h, torch.where(is_best, ar, s), "amin")[..., :k]
    kept = (size > 0).expand(b, hs, k)
    slots = torch.arange(k, device=dev).expand(b, hs, k)
    return MergeSets(indices=torch.where(kept, first, slots), kept=kept, owner=owner, size=size)


def sets_around_kept(ctx: CompressionContext, selection: Selection) -> MergeSets:
    """Merging sets for a selection made by another selector: every valid entry joins the positionally
    nearest kept entry (ties to the earlier one), which acts as the pivot. Per head if the selection is."""
    b, hs, k = selection.indices.shape
    valid = ctx.valid[:, :hs]
    pos = ctx.positions[:, :hs]
    kpos = torch.where(selection.kept, pos.gather(-1, selection.indices), _FAR)
    kpos, slot_of = torch.sort(kpos, dim=-1)
    owner = slot_of.gather(-1, ops.nearest_anchor(kpos, pos))
    owner = torch.where(valid & selection.kept.any(-1, keepdim=True), owner, k)
    size = torch.zeros(b, hs, k + 1, device=owner.device).scatter_add_(-1, owner, valid.float())[..., :k]
    return MergeSets(indices=selection.indices, kept=selection.kept, owner=owner, size=size)


def gaussian_merge(keys: Tensor, values: Tensor, sets: MergeSets, *, sigma: float, sigma_mode: str,
                   scale_values: bool) -> tuple[Tensor, Tensor]:
    """Gaussian-kernel weighted merge of every set around its pivot, per head, in fp32.

    Args:
        keys, values: ``[B, Hkv, S, D]``; sets: from :func:`merging_sets`.
        scale_values: multiply merged values by ``|S|`` (the paper's value rule).
    Returns:
        keys and values of the kept slots ``[B, Hkv, K, D]`` in the input dtype. Singleton sets are
        returned bit-identical; filler slots hold the (invalid) entry at their index.
    """
    b, h, s, _ = keys.shape
    k_slots = sets.size.shape[-1]
    owner = sets.owner.expand(b, h, s)
    valid = owner < k_slots
    piv = ops.expand_heads(sets.indices, h)  # [B, Hkv, K]
    piv_of = piv.gather(-1, owner.clamp_max(max(k_slots - 1, 0)))  # pivot of each entry's set
    k32 = keys.float()
    dist2 = (k32 - ops.gather_seq(k32, piv_of)).pow(2).sum(-1)  # [B, Hkv, S]
    if sigma_mode == "distance":
        tot = torch.zeros(b, h, k_slots + 1, device=keys.device).scatter_add_(
            -1, owner, torch.where(valid, dist2.sqrt(), 0.0))[..., :k_slots]
        sig = (tot / (math.sqrt(2.0) * sets.size.clamp_min(1))).clamp_min(SIGMA_MIN)
        sig2 = sig.gather(-1, owner.clamp_max(max(k_slots - 1, 0))).pow(2)
    else:
        sig2 = torch.tensor(max(sigma, SIGMA_MIN) ** 2, device=keys.device)
    g = torch.where(valid, torch.exp(-dist2 / (2 * sig2)), 0.0)
    den = torch.zeros(b, h, k_slots + 1, device=keys.device).scatter_add_(-1, owner, g)[..., :k_slots]

    def fold(x: Tensor) -> Tensor:  # sum_i g_i x_i / sum_i g_i per slot
        dx = x.shape[-1]
        idx = owner.unsqueeze(-1).expand(b, h, s, dx)
        num = torch.zeros(b, h, k_slots + 1, dx, device=x.device).scatter_add_(2, idx, g.unsqueeze(-1) * x.float())
        return num[:, :, :k_slots] / den.clamp_min(1e-30).unsqueeze(-1)

    k_new = fold(keys)
    v_new = fold(values)
    if scale_values:
        v_new = v_new * sets.size.unsqueeze(-1)
    real = ops.expand_heads(sets.kept, h).unsqueeze(-1)
    return (torch.where(real, k_new, ops.gather_seq(k32, piv)).to(keys.dtype),
            torch.where(real, v_new, ops.gather_seq(values.float(), piv)).to(values.dtype))


def fit_protection(valid: Tensor, prot: Tensor, n: Tensor, total: Tensor, *, sink: int, recent: Tensor,
                   heavy: Tensor, base_recent: Tensor, shares: tuple[float, float]) -> tuple[Tensor, Tensor, Tensor]:
    """Recent and heavy-hitter counts ``[B]`` that leave room for the merging sets within ``total`` ``[B]``.

    A row fits when its protected entries plus one entry per run of unprotected entries (each run becomes
    at least one set) fit its budget. Rows that do not fit get both method shares scaled by one factor
    so that ``recent + 2 * heavy <= total - sink - 1`` (every heavy hitter can split a run: at most
    ``heavy + 1`` runs); the budget's own recent window (``base_recent``) is never cut. Returns the counts
    and which rows were shrunk. With the counts returned, exact mode meets the budget exactly.
    """
    free = valid & ~prot
    starts = free.clone()
    starts[..., 1:] &= ~free[..., :-1]
    fits = prot.sum(-1).view(-1) + starts.sum(-1).view(-1) <= total
    room = (total - sink - 1).clamp_min(0)
    need = (recent + 2 * heavy).clamp_min(1)
    f = (room.double() / need.double()).clamp(max=1.0)
    r = torch.maximum((_fraction(n, shares[0]).double() * f).floor().long(), base_recent)
    a = torch.minimum((heavy.double() * f).floor().long(), ((room - r).clamp_min(0)) // 2)
    shrunk = ~fits & ((r != recent) | (a != heavy))
    return torch.where(shrunk, r, recent), torch.where(shrunk, a, heavy), shrunk


def _warn_over_budget(step: KVMergerSets, ctx: CompressionContext) -> None:
    """One :class:`~kvpolicy.errors.BudgetWarning` per distinct message (Python's default filter)."""
    tokens = int(ctx.budget.total.max())
    size = f"ratio {ctx.budget.ratio}" if ctx.budget.ratio is not None else f"{tokens} token{'s' * (tokens != 1)}"
    if step.mode == "fixed":
        msg = (f"selector 'kvmerger' (mode fixed, similarity {step.similarity}) keeps what its threshold gives, "
               f"more than the budget ({size}) on some layers (figures 'entries', 'over_budget'); the preset "
               f"'kvmerger' (mode capped) or 'kvmerger-exact' (mode exact) keeps within the budget")
    else:
        msg = (f"selector 'kvmerger' (mode {step.mode}) cannot meet the budget ({size}, sink {ctx.budget.sink}): "
               f"the protected entries and one entry per run of unprotected ones do not fit (figure "
               f"'over_budget'); use a larger budget or fewer sinks")
    warnings.warn(msg, BudgetWarning, stacklevel=2)


# --------------------------------------------------------------------------------------------- steps
class KVMergerSets(Selector):
    """KVMerger: protect recent + heavy hitters, merge runs of adjacent similar keys (pivot = most attended)."""

    name: ClassVar[str] = "kvmerger"
    paper: ClassVar[str] = "KVMerger, Wang et al. 2024, arXiv:2407.08454"
    similarity: float = Field(default=0.75, ge=-1.0, le=1.0, description="epsilon: adjacent key cosine above "
                                                                        "which two entries share a set (fixed and "
                                                                        "capped modes)")
    recent: float = Field(default=0.17, ge=0.0, le=1.0, description="rho_r: share of the valid length kept as "
                                                                  "the recent window")
    heavy: float = Field(default=0.12, ge=0.0, le=1.0, description="rho_a: share of the valid length kept as "
                                                                 "heavy hitters (highest head-mean score)")
    mode: Literal["fixed", "capped", "exact"] = Field(
        default="fixed", description="fixed: threshold epsilon, the size is what it gives (warns when above the "
        "budget); capped: threshold epsilon, more similar pairs merged when that exceeds the budget; exact: merge "
        "the most similar pairs to meet the budget")
    skip_edge_layers: bool = Field(default=False, description="leave layers 0, 1 and the last uncompressed")

    def select(self, ctx: CompressionContext, scores: Tensor, priority: Tensor | None) -> Selection:
        valid = ctx.valid[:, :1]
        b = valid.shape[0]
        n = valid.sum(-1).view(b)
        shared = scores.float().mean(1, keepdim=True)
        total = ctx.budget.total.to(n.device)
        base_recent = ctx.budget.recent.to(n.device)
        recent = torch.maximum(_fraction(n, self.recent), base_recent)
        heavy = _fraction(n, self.heavy)
        prot = protected_entries(valid, shared, sink=ctx.budget.sink, recent=recent, heavy=heavy)
        shrunk = torch.zeros(b, dtype=torch.bool, device=n.device)
        if self.mode != "fixed":  # the protected shares must leave room for the merging sets
            recent, heavy, shrunk = fit_protection(valid, prot, n, total, sink=ctx.budget.sink, recent=recent,
                                                   heavy=heavy, base_recent=base_recent,
                                                   shares=(self.recent, self.heavy))
            if bool(shrunk.any()):
                prot = protected_entries(valid, shared, sink=ctx.budget.sink, recent=recent, heavy=heavy)
        free = valid & ~prot
        joinable = free[..., :-1] & free[..., 1:]
        skip = self.skip_edge_layers and ctx.layer_idx in (0, 1, ctx.n_layers - 1)
        if skip:
            join = torch.zeros_like(joinable)
        elif self.mode == "fixed":
            join = joinable & (adjacent_cosine(ctx.keys) > self.similarity)
        else:
            cos = adjacent_cosine(ctx.keys)
            need = (free.sum(-1).view(b) - (total - prot.sum(-1).view(b))).clamp_min(0)
            if self.mode == "capped":  # the threshold's joins, or more if they leave the layer above budget
                need = torch.maximum(need, (joinable & (cos > self.similarity)).sum(-1).view(b))
            n_join = torch.minimum(need, joinable.sum(-1).view(b))
            join = exact_joins(cos, joinable, n_join)
        sets = merging_sets(valid, join, scores.float())
        entries = sets.kept[:, 0].sum(-1)
        compressing = total < n
        over = int(((entries - total).clamp_min(0) * compressing).sum()) if not skip else 0
        ctx.figures.update(entries=round(float(entries.float().mean()), 1), protected=int(prot.sum()) // b,
                           achieved_ratio=round(float((entries / n.clamp_min(1)).mean()), 4), over_budget=over,
                           protection_shrunk=int(shrunk.sum()))
        if over:
            _warn_over_budget(self, ctx)
        return sets
class KVMergerGaussian(Merger):
    """KVMerger merge: Gaussian-kernel weights around each set's pivot.

    With selector ``kvmerger`` the sets are its merging sets. With any other selector, every evicted entry
    joins the positionally nearest kept entry (ties to the earlier one), which is then the pivot.
    """

    name: ClassVar[str] = "kvmerger"
    paper: ClassVar[str] = "KVMerger, Wang et al. 2024, arXiv:2407.08454"
    sigma: float = Field(default=5.0, gt=0.0, description="kernel bandwidth (sigma_mode constant)")
    sigma_mode: Literal["constant", "distance"] = Field(default="constant", description="constant sigma, or per "
                                                        "set: mean key distance to the pivot / sqrt(2)")
    mass: Literal["scaled", "mean", "bias"] = Field(default="scaled", description="values: |S| * weighted sum "
                                                    "(paper), weighted mean, or weighted mean + log|S| logit bias")

    def merge(self, ctx: CompressionContext, selection: Selection, scores: Tensor) -> Merged:
        if not isinstance(selection, MergeSets):  # another selector: sets = kept entry + nearest evicted ones
            selection = sets_around_kept(ctx, selection)
        k, v = gaussian_merge(ctx.keys, ctx.values, selection, sigma=self.sigma, sigma_mode=self.sigma_mode,
                              scale_values=self.mass == "scaled")
        h = ctx.keys.shape[1]
        folded = round(int((selection.size - 1).clamp_min(0).sum()) / selection.size.shape[1])
        if self.mass != "bias":
            return Merged(keys=k, values=v, merged=folded)
        mult = ops.expand_heads(selection.size, h).clamp_min(1.0)
        if ctx.multiplicity is not None:  # entries that already stood for several tokens
            owner = selection.owner.expand_as(ctx.multiplicity)
            mult = torch.zeros(*owner.shape[:2], mult.shape[-1] + 1, device=mult.device).scatter_add_(
                -1, owner, torch.where(owner < mult.shape[-1], ctx.multiplicity.float(), 0.0))[..., :-1]
            mult = mult.clamp_min(1.0)
        return Merged(keys=k, values=v, merged=folded, multiplicity=mult, bias=mult.log())
