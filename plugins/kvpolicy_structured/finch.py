"""Finch (Corallo & Papotti, TACL 2024, doi 10.1162/tacl_a_00716): the question attends over the context.

The prompt is ``context + question``; the question is the last ``window`` valid tokens of the prompt. Per
layer, KV head ``κ`` and context entry ``j`` (an entry before the question), with the attention
``A_h[i, j]`` of question query ``i`` in query head ``h`` (fp32, causal):

    s_κj = (1 / w) Σ_{i ∈ question} n_i · mean_{h ∈ group(κ)} A_h[i, j]

where ``n_i`` is the number of valid entries before query ``i`` (Finch's normalisation: under the causal
mask a later query spreads its attention over more keys, so its weights are scaled back by the number of
keys it sees; kvpress's ``normalize_scores`` multiplies by the query's 0-based position, the same ``n_i``
without padding). No pooling. The question's own entries score above every context entry, by recency
(``2²³ + rank``, as the ``snapkv`` scorer), so the question is kept; ``topk`` then keeps the best context
entries per KV head up to the budget.

Decisions:

* **Where the question is.** kvpress inserts a delimiter token (added to the tokenizer, the embedding
  matrix resized) between context and question and takes everything after it as the window. A cache
  policy does not see token ids, so we take the last ``window`` tokens of the prompt (default 32, the
  ``snapkv`` preset's window); set ``window`` to the question's length when it is known
  (``kvpolicy.load_policy("finch", scorer={"name": "finch", "window": n})``).
* **Chunked selection** (kvpress's optional ``chunk_length``, default off): the ``chunked-topk`` selector
  (:mod:`kvpolicy_structured.chunked`) keeps a share of every chunk of the prompt instead of a global
  top-k. The paper's sequential form (prefill a document chunk together with the question, compress,
  continue with the next chunk) changes the prefill itself and is not implemented.
* **Positions.** kvpress re-rotates the kept keys to contiguous positions (``rerotate_keys``); kvpolicy
  keeps the true positions of the kept entries (as for every policy).
* The normalisation can be switched off (``normalize: false``: the plain mean of the question's attention).

Cost: ``w`` single-query attention rows per layer (``[B, H, 1, S]`` each, :func:`kvpolicy.observe.attention_colsum`):
``O(w · S)``, no ``L x L`` tensor.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field
from torch import Tensor

from kvpolicy import observe, ops
from kvpolicy.policy import CompressionContext, Scorer
from kvpolicy_baselines.scorers import WINDOW_FLOOR


def question_attention(ctx: CompressionContext, window: int, normalize: bool) -> Tensor:
    """``[B, Hkv, S]`` fp32: ``(1/w) Σ_i n_i A[i, j]`` over the last ``window`` queries (``n_i = 1`` without
    normalisation), query heads reduced to their KV head by the mean."""
    q = ctx._need_queries(f"Finch's question attention (window {window})")
    w = min(window, q.shape[2])
    qpos, qvalid = ctx.query_pos[:, -w:], None if ctx.query_valid is None else ctx.query_valid[:, -w:]
    if not normalize:
        return ctx.window_attention(window) / w
    # n_i: valid entries before query i (positions are logical: left padding does not count)
    seen = (ctx.valid[:, :1] & (ctx.positions[:, :1] < qpos[:, :, None])).sum(-1).float()  # [B, w]
    out = torch.zeros(ctx.shape, dtype=torch.float32, device=ctx.keys.device)
    for i in range(w):  # one query at a time: each row of attention weighted by its own n_i
        row = observe.attention_colsum(q[:, :, [q.shape[2] - w + i]], ctx.keys, scaling=ctx.scaling,
                                       query_pos=qpos[:, i:i + 1], key_pos=ctx.positions, key_bias=ctx.key_bias,
                                       query_valid=None if qvalid is None else qvalid[:, i:i + 1], form=ctx.form)
        out.add_(row * seen[:, i].view(-1, 1, 1))
    return out / w


class Finch(Scorer):
    """Finch: the question's (last ``window`` tokens') attention over the context, normalised by the keys each
    query sees; the question is kept."""

    name: ClassVar[str] = "finch"
    paper: ClassVar[str] = "FINCH, Corallo and Papotti, TACL 2024, doi:10.1162/tacl_a_00716"
    observations: ClassVar[frozenset[str]] = frozenset({"window_attention"})
    window: int = Field(default=32, ge=1, description="question tokens: the last tokens of the prompt")
    normalize: bool = Field(default=True, description="scale each query's attention by the entries it sees")

    def score(self, ctx: CompressionContext) -> Tensor:
        votes = question_attention(ctx, self.window, self.normalize)
        rank, count = ops.valid_rank(ctx.valid)
        question = ctx.valid & (rank >= count.unsqueeze(-1) - self.window)
        return torch.where(question, WINDOW_FLOOR + rank.float(), torch.where(ctx.valid, votes, 0.0))
