"""Generic steps every policy composes: top-k selection, no merge, decode rules, layer schedules."""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field
from torch import Tensor

from kvpolicy import ops
from kvpolicy.policy import (Compact, CompressionContext, DecodeRule, DecodeView, LayerSchedule, Merged, Merger,
                             Selection, Selector, gather_kept)


class TopK(Selector):
    """Keep the sinks, the recent window and the highest-scoring rest, up to the layer budget."""

    name: ClassVar[str] = "topk"
    promises: ClassVar[frozenset[str]] = frozenset({"exact_size", "protected", "nested"})

    def select(self, ctx: CompressionContext, scores: Tensor, priority: Tensor | None) -> Selection:
        hs = scores.shape[1]
        valid = ctx.valid[:, :hs] if hs == 1 else ctx.valid
        forced = ops.protected_mask(valid, ctx.budget.sink, ctx.budget.recent)
        k = int(ctx.budget.total.max())
        idx, kept = ops.topk_keep(scores, k, valid=valid, forced=forced, priority=priority,
                                  per_row=ctx.budget.total.to(scores.device))
        return Selection(indices=idx, kept=kept)


class KeepAll(Selector):
    """Keep every entry whatever the budget (the uncompressed reference)."""

    name: ClassVar[str] = "all"

    def select(self, ctx: CompressionContext, scores: Tensor, priority: Tensor | None) -> Selection:
        b, h, s = ctx.shape
        idx = torch.arange(s, device=ctx.keys.device).expand(b, 1, s)
        return Selection(indices=idx, kept=ctx.valid[:, :1])


class NoMerge(Merger):
    """Evict: keep the selected entries unchanged, drop the others."""

    name: ClassVar[str] = "none"
    promises: ClassVar[frozenset[str]] = frozenset({"gather", "identity_on_equal", "convex"})

    def merge(self, ctx: CompressionContext, selection: Selection, scores: Tensor) -> Merged:
        k, v = gather_kept(ctx, selection)
        return Merged(keys=k, values=v)


class NoDecode(DecodeRule):
    """Look once: compress at prefill only; the cache grows by one entry per generated token."""

    name: ClassVar[str] = "none"


class Rolling(DecodeRule):
    """Keep the budget while decoding: compact back to the budget every ``every`` new tokens.

    Scorers that need accumulated attention get H2O-style accumulation of every decode query; window
    scorers see the last ``query_window`` queries.
    """

    name: ClassVar[str] = "rolling"
    paper: ClassVar[str] = "H2O, Zhang et al., NeurIPS 2023, arXiv:2306.14048"
    compacts: ClassVar[bool] = True
    every: int = Field(default=16, ge=1, description="compact once the cache exceeds the budget by this many")
    query_window: int = Field(default=32, ge=1, description="recent queries kept for window observations")

    def on_decode(self, view: DecodeView) -> Compact | None:
        held = view.length if view.entries is None else view.entries  # mean per head: adaptive heads differ
        return Compact() if held >= view.target + self.every else None


class Uniform(LayerSchedule):
    """Every layer gets the same budget."""

    name: ClassVar[str] = "uniform"
    promises: ClassVar[frozenset[str]] = frozenset({"same_total"})


class Pyramid(LayerSchedule):
    """PyramidKV: budgets decrease linearly with depth, same total as uniform.

    With observation window ``w`` (capped at the budget) and average selectable budget ``m = B - w``:
    ``min = m / beta``, ``max = 2m - min``, ``B_l = w + max - l (max - min) / (N - 1)``. When ``max`` would
    exceed what a layer can select (``L - w`` for a prompt of ``L`` tokens), it is capped there and
    ``min = 2m - max`` (PyramidKV's code): the schedule stays linear with the same mean. The policy then
    rounds so the layers keep exactly ``N`` times the uniform budget (:func:`kvpolicy.policy.fit_total`).
    """

    name: ClassVar[str] = "pyramid"
    paper: ClassVar[str] = "PyramidKV, Cai et al. 2024, arXiv:2406.02069"
    promises: ClassVar[frozenset[str]] = frozenset({"same_total"})
    beta: float = Field(default=20.0, gt=1.0, description="ratio between the largest and smallest share")
    window: int = Field(default=32, ge=0, description="observation window kept by every layer")

    def layer_total(self, avg_total: Tensor, recent: Tensor, layer_idx: int, n_layers: int, *,
                    n_valid: Tensor | None = None) -> Tensor:
        if n_layers < 2:
            return avg_total
        w = torch.minimum(torch.full_like(avg_total, self.window), avg_total).double()
        m = (avg_total.double() - w).clamp_min(0)
        lo = m / self.beta
        hi = 2 * m - lo
        if n_valid is not None:
            cap = (n_valid.double() - w).clamp_min(0)
            hi = torch.minimum(hi, cap)
            lo = 2 * m - hi
        return w + hi - layer_idx * (hi - lo) / (n_layers - 1)  # real-valued: the policy rounds
