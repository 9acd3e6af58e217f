"""CORM (arXiv 2404.15949): keep what the recent queries attended.

Paper: "CORM: Cache Optimization with Recent Message for Large Language Model Inference" (Dai et al. 2024).
Observation: adjacent queries look at similar keys, so the last ``w`` queries tell which keys the next one
will need. A key ``j`` is *important* when some query of the recent window gives it more than a
``lambda`` share of the uniform attention ``1 / t_i`` (``t_i`` = keys query ``i`` can see):

    keep j  <=>  exists i in W (the last w queries):  A[i, j] >= lambda / t_i

The paper's form is **budget-free**: every key passing the test is kept, plus the recent window ``W``
itself (whose queries have not been judged by later ones); the cache size follows the text.

What we do (decisions where the paper is silent, or where kvpolicy needs a budget):

* The scorer :class:`CORM` returns ``s_j = max_{i in W} A[i, j] * t_i`` (attention relative to the
  uniform share, so ``s_j >= lambda`` is the paper's test) and composes with ``topk``: the **budgeted
  form** keeps the ``B`` entries of largest relative attention. The window's own entries score above
  every other entry (ordered by recency, as SnapKV's window), so the window is always kept when the
  budget allows.
* The selector :class:`CORMThreshold` is the paper's **budget-free form**: it keeps the sinks, the
  window and every entry with ``s_j >= lambda`` - but never more than the layer budget (a cap, ranked
  by ``s``), so the cache stays within what the policy promised; ``budget.ratio: 1.0`` removes the cap
  (the paper's form exactly).
* GQA: "any query" is taken over the query heads of the KV group too (max over group and window),
  consistent with the test's existential form (a mean would dilute one head's strong vote).
* ``t_i`` counts the valid cache entries query ``i`` sees (a merged entry counts once); padding and
  fillers count for nothing, so a left-padded row scores as the row alone.
* ``lambda`` default 1.0 (the key gets more than the uniform share); ``window`` default 32.

Shapes: queries ``[B, H, Q, D]`` post-RoPE, keys ``[B, Hkv, S, D]``, scores ``[B, Hkv, S]`` fp32. The
window's attention is computed by query chunks (``w x S`` at most, never ``S x S``).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field
from torch import Tensor

from kvpolicy import observe, ops
from kvpolicy.policy import CompressionContext, Scorer, Selection, Selector

WINDOW_FLOOR = float(2**23)  # window entries: above any relative attention (<= t <= 2**23), fp32-exact ranks


def relative_window_max(ctx: CompressionContext, window: int) -> Tensor:
    """``[B, Hkv, S]``: ``max_{i in last window queries, h in group} A_h[i, j] * t_i`` (fp32).

    ``t_i`` = number of valid entries visible to query ``i`` (its uniform attention is ``1 / t_i``).
    """
    q = ctx._need_queries(f"CORM's window attention (window {window})")
    w = min(window, q.shape[2])
    q, qpos = q[:, :, -w:], ctx.query_pos[:, -w:]
    qvalid = None if ctx.query_valid is None else ctx.query_valid[:, -w:]
    valid = ctx.valid[:, :1]  # [B, 1, S], shared by the heads
    seen = (valid.unsqueeze(2) & (ctx.positions[:, :1, None, :] <= qpos[:, None, :, None])).sum(-1)  # [B, 1, w]
    out = torch.zeros(ctx.shape, dtype=torch.float32, device=ctx.keys.device)
    for lo, probs, _ in observe._prob_chunks(q, ctx.keys, ctx.scaling, qpos, ctx.positions, ctx.key_bias, qvalid,
                                             ops.DEFAULT_CHUNK_BYTES, ctx.form):
        c, n = probs.shape[3], probs.shape[4]
        t = seen[:, :, lo:lo + c].float()[:, :, None, :, None]  # [B, 1, 1, c, 1]
        rel = (probs * t).amax(dim=(2, 3))  # max over the group and the chunk's queries
        out[..., :n] = torch.maximum(out[..., :n], rel)
    return torch.where(ctx.valid, out, 0.0)


class CORM(Scorer):
    """CORM: max over the last ``window`` queries of the attention relative to the uniform share (A * t)."""

    name: ClassVar[str] = "corm"
    paper: ClassVar[str] = "CORM, Dai et al. 2024, arXiv:2404.15949"
    observations: ClassVar[frozenset[str]] = frozenset({"window_attention"})
    window: int = Field(default=32, ge=1, description="recent queries that vote (their entries are kept first)")

    def score(self, ctx: CompressionContext) -> Tensor:
        rel = relative_window_max(ctx, self.window)
        rank, count = ops.valid_rank(ctx.valid)
        in_window = ctx.valid & (rank >= count.unsqueeze(-1) - self.window)
        return torch.where(in_window, WINDOW_FLOOR + rank.float(), rel)


class CORMThreshold(Selector):
    """CORM's budget-free rule: keep sinks, the window and every entry scoring >= ``lam``, capped at the budget.

    With the ``corm`` scorer a score ``>= lam`` means some recent query gave the entry more than ``lam``
    times its uniform share. Entries below the threshold are dropped even when the budget has room; when
    more entries pass than the budget allows, the highest-scoring ones are kept (``topk`` order).
    """

    name: ClassVar[str] = "corm-threshold"
    paper: ClassVar[str] = "CORM, Dai et al. 2024, arXiv:2404.15949"
    promises: ClassVar[frozenset[str]] = frozenset({"protected"})
    lam: float = Field(default=1.0, ge=0.0, description="threshold on attention relative to the uniform share")

    def select(self, ctx: CompressionContext, scores: Tensor, priority: Tensor | None) -> Selection:
        hs = scores.shape[1]
        valid = ctx.valid[:, :hs] if hs == 1 else ctx.valid
        forced = ops.protected_mask(valid, ctx.budget.sink, ctx.budget.recent)
        best = torch.zeros_like(valid).scatter_(-1, torch.where(valid, scores, float("-inf")).argmax(-1, keepdim=True),
                                                True)  # the best entry always passes: no head is left empty
        passing = valid & (forced | best | (scores >= self.lam))
        total = ctx.budget.total.to(scores.device)
        per_row = torch.minimum(total, passing.sum(-1).amax(-1))  # heads of a row share the row's slot count
        k = int(per_row.max())
        idx, kept = ops.topk_keep(scores, k, valid=passing, forced=forced, priority=priority, per_row=per_row)
        ctx.figures["corm_passing"] = round(float(passing.sum()) / hs)
        return Selection(indices=idx, kept=kept)
