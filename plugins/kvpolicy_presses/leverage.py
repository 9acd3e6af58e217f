"""Leverage-score selection (Chari & Van Durme, arXiv 2507.08143, kvpress ``LeverageScorePress``; CurDKV,
arXiv 2509.15038, kvpress ``CURPress``): keep the keys that span the key space.

The statistical leverage of row ``j`` of an ``[n, D]`` matrix ``X`` is the ``j``-th diagonal entry of the
projection onto its column space,

    h_j = [X (X^T X)^+ X^T]_{jj} = ||U_j||^2,    X = U diag(sigma) V^T (thin SVD),  0 <= h_j <= 1,  sum_j h_j = rank X

so a key with high leverage points in a direction few other keys cover: evicting it loses a part of the
key space that no kept key can stand in for (an outlier, in Compactor's words). Computed from the thin
SVD of ``[n, D]`` (``O(n D^2)``); the ``n x n`` projection is never formed.

``source`` picks what is scored, as kvpress's ``CURPress`` ``leverage_type``: ``key`` (``h(K)``), ``value``
(``h(V)``), ``kv_avg`` (``(h(K) + h(V)) / 2``) or ``kv_product`` (``h(K) h(V)``, CurDKV's default).

Decisions:

* **Exact leverage** instead of kvpress's approximations: ``LeverageScorePress`` sketches the keys to 48
  random dimensions (and regularises a Cholesky factor with jitter), ``CURPress`` replaces leverage by
  squared row norms normalised over windows of 16 tokens. Here the SVD is exact, in fp64, with the
  pseudo-inverse's rank cut at ``sigma > max(n, D) * eps * sigma_max`` (numpy's ``matrix_rank``
  tolerance); a matrix of rank ``n`` gives every row leverage 1. Scores are rounded to fp32, which makes
  mathematically equal leverages (e.g. every row of a full-rank short matrix) compare equal.
* **Centred** over the row's valid entries (``center: true``, as ``LeverageScorePress``): the leverage of the
  deviations from the mean key, not of the mean direction every key shares.
* **Pre-RoPE keys** (``pre_rope: true``, as ``LeverageScorePress``, which recomputes them from the hidden
  states): the cached keys are rotated back by their position offset from the row's first valid entry
  (RoPE base ``rope_theta``, default 100000 = the embedded SmolLM2; ``rotate_half`` layout). A rotation
  common to all keys does not change leverage, so the offset (not the absolute position) suffices and
  left padding changes nothing. ``pre_rope: false`` scores the cached post-RoPE keys. Values have no RoPE.
* **Per row and KV head**, on its valid entries only (pads are not part of ``X``).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor

from kvpolicy.policy import CompressionContext, Scorer

from kvpolicy_presses._rows import inv_freq, rotate, score_rows


def leverage(x: Tensor, center: bool = True) -> Tensor:
    """``[n]`` fp64 leverage scores of the rows of ``x [n, D]`` (``diag(X (X^T X)^+ X^T)``, thin SVD)."""
    x = x.double()
    if center:
        x = x - x.mean(dim=0, keepdim=True)
    u, sigma, _ = torch.linalg.svd(x, full_matrices=False)  # u [n, min(n, D)]
    if sigma.numel() == 0 or float(sigma[0]) == 0.0:
        return x.new_zeros(x.shape[0])
    tol = sigma[0] * max(x.shape) * torch.finfo(torch.float64).eps
    return (u[:, sigma > tol] ** 2).sum(dim=-1)


class Leverage(Scorer):
    """Statistical leverage of each key (and/or value) row, from a thin SVD (CUR / Compactor-style selection)."""

    name: ClassVar[str] = "leverage"
    paper: ClassVar[str] = "leverage scores: arXiv:2507.08143; CurDKV: arXiv:2509.15038"
    source: Literal["key", "value", "kv_avg", "kv_product"] = Field(
        default="key", description="key, value, kv_avg ((h_k + h_v) / 2) or kv_product (h_k * h_v)")
    center: bool = Field(default=True, description="subtract the mean row before the SVD")
    pre_rope: bool = Field(default=True, description="rotate the cached keys back to before RoPE")
    rope_theta: float = Field(default=100000.0, gt=0.0,
                              description="the model's RoPE base (for pre_rope); 100000 = embedded SmolLM2")

    def score(self, ctx: CompressionContext) -> Tensor:
        freq = inv_freq(ctx.keys.shape[-1], self.rope_theta, ctx.keys.device) if self.pre_rope else None

        def one(r: int, j: int, idx: Tensor) -> Tensor:
            h_k = h_v = None
            if self.source != "value":
                keys = ctx.keys[r, j, idx].double()
                if freq is not None:
                    pos = ctx.positions[r, j, idx]
                    keys = rotate(keys, pos[0] - pos, freq)  # back by the offset from the first valid entry
                h_k = leverage(keys, self.center)
            if self.source != "key":
                h_v = leverage(ctx.values[r, j, idx], self.center)
            if self.source == "key":
                out = h_k
            elif self.source == "value":
                out = h_v
            elif self.source == "kv_avg":
                out = (h_k + h_v) / 2
            else:
                out = h_k * h_v
            return out.float()

        return score_rows(ctx, one)
