"""KeyDiff (Park et al., arXiv 2504.15364; kvpress ``KeyDiffPress``): keep the keys least like the others.

Per KV head, the anchor is the mean of the unit-normalised keys, and a key's score is its negative cosine
similarity to the anchor:

    a = mean_j k_j / ||k_j||,     score_j = -cos(k_j, a) = -(k_j . a) / (||k_j|| ||a||)

Distinctive keys (far from the anchor) are kept; no query or attention is needed.

Decisions:

* **One shot**, as kvpress's ``KeyDiffPress``: the paper evicts block by block while the prompt is
  read (kvpress: ``BlockPress``); here the whole prompt is scored at once at the end of the prefill.
* **Anchor over the valid entries** of the row and head (pads excluded), the cached post-RoPE keys
  (as kvpress), in fp32.
* **Zero keys.** Normalisation divides by ``max(||k||, 1e-12)`` and the cosine by
  ``max(||k||, 1e-8) * max(||a||, 1e-8)`` (torch's ``normalize`` / ``cosine_similarity`` epsilons): a zero
  key has similarity 0.
* No sinks (kvpress's press has none; the preset's ``budget.sink`` is 0).
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from kvpolicy.policy import CompressionContext, Scorer

from kvpolicy_presses._rows import score_rows

NORM_EPS = 1e-12  # torch.nn.functional.normalize
COS_EPS = 1e-8  # torch.nn.functional.cosine_similarity


class KeyDiff(Scorer):
    """KeyDiff: negative cosine similarity of each key to the mean normalised key of its head."""

    name: ClassVar[str] = "keydiff"
    paper: ClassVar[str] = "KeyDiff, Park et al. 2025, arXiv:2504.15364"

    def score(self, ctx: CompressionContext) -> Tensor:
        def one(r: int, j: int, idx: Tensor) -> Tensor:
            keys = ctx.keys[r, j, idx].float()  # [n, D]
            norms = keys.norm(dim=-1)  # [n]
            anchor = (keys / norms.clamp_min(NORM_EPS)[:, None]).mean(dim=0)  # [D]
            cos = (keys @ anchor) / (norms.clamp_min(COS_EPS) * anchor.norm().clamp_min(COS_EPS))
            return -cos

        return score_rows(ctx, one)
