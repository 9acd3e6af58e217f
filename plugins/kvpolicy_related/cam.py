"""CaM (Zhang et al., ICML 2024, "CaM: Cache Merging for Memory-efficient LLMs Inference", PMLR v235).

CaM wraps an eviction policy (H2O here: ``h2o-cam``) and, instead of dropping an evicted token, merges
its **value** into the kept tokens that follow it; keys of evicted tokens are discarded (the kept keys
are untouched, so the attention logits of kept entries do not change, only what they return).

For an evicted token ``i`` with accumulated attention ``a_i`` (H2O's score) and merge window ``W_i`` =
the next ``m`` kept tokens after ``i`` (in position order, per KV head):

    p_i = clip(a_i / mean_{j in W_i} a_j, 0, 1)        (merge probability: its attention share)
    M_i ~ Bernoulli(p_i)
    v_j <- v_j + M_i * v_i / m        for every j in W_i

Decisions where the paper is silent (ALGORITHMS.md section 5):

* ``a`` is the accumulated attention ``ctx.accumulated_attention()`` (the ``h2o`` score; memoised, so
  with H2O's scorer it costs nothing), whatever the scorer: the probability is an attention share.
* Sampling: ``sample=True`` (paper) draws ``M_i`` from a generator seeded by ``seed``, the layer and
  the KV head; the ``r``-th valid entry of a row gets the ``r``-th draw, so a left-padded row merges as
  the row alone (batch independence). ``sample=False`` merges the expectation ``p_i v_i / m``
  (deterministic).
* A token with fewer than ``m`` kept tokens after it (only near the end, which the recent window
  keeps) merges ``v_i / m`` into those there are (the paper's formula taken literally: the missing
  share is lost); with none after it, it is dropped. ``mean_{j in W_i} a_j`` is over the existing ones.
  A window whose mean attention is 0 gives ``p_i = 1`` when ``a_i > 0``, else 0.
* Merges are simultaneous: every ``v_j`` update uses the pre-merge values of the evicted tokens.
* ``m`` default 4 (``merge_window``). Filler slots never receive anything.

Shapes: values ``[B, Hkv, S, D]``; the merge is ``m`` scatter-adds of the ``E`` evicted values
(``[B, Hkv, E, D]``), no ``E x K`` matrix.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field
from torch import Tensor

from kvpolicy import ops
from kvpolicy.policy import CompressionContext, Merged, Merger, Selection, evicted_indices, gather_kept

FAR = 2**62  # the position of filler slots: sorted after every kept slot


def next_kept_slots(ctx: CompressionContext, selection: Selection, ev_idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """For each evicted entry, the kept slots that follow it in position order.

    Returns ``slot_of [B, Hkv, K]`` (kept slots sorted by position, fillers last), ``first [B, Hkv, E]``
    (rank, in that order, of the first kept slot after the entry) and ``n_kept [B, Hkv, 1]``.
    """
    h = ctx.shape[1]
    idx = ops.expand_heads(selection.indices, h)
    kept = ops.expand_heads(selection.kept, h)
    anchor = torch.where(kept, ctx.positions.gather(-1, idx), FAR)
    anchor, slot_of = torch.sort(anchor, dim=-1)
    ev_pos = ctx.positions.gather(-1, ev_idx)
    first = torch.searchsorted(anchor.contiguous(), ev_pos.contiguous(), right=True)
    return slot_of, first, kept.sum(-1, keepdim=True)


def bernoulli_draws(ctx: CompressionContext, seed: int) -> Tensor:
    """``[B, Hkv, S]`` uniform draws in ``[0, 1)``: the r-th valid entry of a row gets draw r of its head."""
    b, h, s = ctx.shape
    base = seed * 100003 + ctx.layer_idx
    draws = torch.stack([torch.rand(s, generator=torch.Generator(device="cpu").manual_seed(base + 7919 * j))
                         for j in range(h)])  # [Hkv, S]
    rank, _ = ops.valid_rank(ctx.valid)
    return draws.to(ctx.keys.device).expand(b, h, s).gather(-1, rank.clamp_min(0))


class CaM(Merger):
    """CaM: merge each evicted value into the next ``m`` kept ones, with probability its attention share."""

    name: ClassVar[str] = "cam"
    paper: ClassVar[str] = "CaM, Zhang et al., ICML 2024, openreview.net/forum?id=LCTmppB165"
    observations: ClassVar[frozenset[str]] = frozenset({"accumulated_attention"})
    # no promise: v_j + v_i / m is neither convex nor the identity on equal values (it adds mass)
    merge_window: int = Field(default=4, ge=1, description="m: kept tokens after an evicted one that share its value")
    sample: bool = Field(default=True, description="draw M_i ~ Bernoulli(p_i) (paper); False: merge p_i * v_i")
    seed: int = Field(default=0, description="seed of the Bernoulli draws (with the layer and head)")

    def merge(self, ctx: CompressionContext, selection: Selection, scores: Tensor) -> Merged:
        keys, values = gather_kept(ctx, selection)  # keys are never changed
        ev_idx, ev_valid = evicted_indices(ctx, selection)  # [B, Hkv, E]
        if ev_idx.shape[-1] == 0:
            return Merged(keys=keys, values=values)
        acc = ctx.accumulated_attention().float().expand(ctx.shape)
        slot_of, first, n_kept = next_kept_slots(ctx, selection, ev_idx)
        a_kept = acc.gather(-1, ops.expand_heads(selection.indices, ctx.shape[1])).gather(-1, slot_of)  # by position
        m = self.merge_window
        win_sum = torch.zeros(ev_idx.shape, dtype=torch.float32, device=keys.device)
        win_n = torch.zeros_like(win_sum)
        for r in range(m):
            rank = first + r
            ok = rank < n_kept
            win_sum += torch.where(ok, a_kept.gather(-1, rank.clamp(max=slot_of.shape[-1] - 1)), 0.0)
            win_n += ok.float()
        a_ev = acc.gather(-1, ev_idx)
        mean = win_sum / win_n.clamp_min(1)
        p = torch.where(mean > 0, a_ev / mean.clamp_min(1e-30), (a_ev > 0).float()).clamp(0.0, 1.0)
        if self.sample:
            weight = (bernoulli_draws(ctx, self.seed).gather(-1, ev_idx) < p).float()
        else:
            weight = p
        use = ev_valid & (win_n > 0) & (weight > 0)
        src = ops.gather_seq(ctx.values, ev_idx)
        out = values.float()  # accumulate the m scatter-adds in fp32, cast once
        ones = torch.ones(keys.shape[:3], dtype=torch.float32, device=keys.device)
        for r in range(m):
            rank = first + r
            ok = use & (rank < n_kept)
            target = slot_of.gather(-1, rank.clamp(max=slot_of.shape[-1] - 1))
            out = ops.scatter_mean(out, src, target, src_weight=weight / m, normalize=ones, src_valid=ok)
        out = out.to(values.dtype)  # untouched slots round-trip exactly
        h = ctx.shape[1]
        n_used = int(use.sum())
        ctx.figures["cam_merged"] = round(n_used / h)
        if n_used:
            ctx.figures["cam_p_mean"] = float(p[ev_valid].mean())
        return Merged(keys=keys, values=out, merged=round(n_used / h))
