"""LagKV (Liang et al., arXiv 2504.04704; kvpress ``LagKVPress``): lag-relative scores, no attention needed.

After ``n_sink`` sink tokens the sequence is cut into chunks of ``L = lag_size`` tokens; each chunk ``c`` is
judged against the next one (its "lag" reference ``c + 1``): per channel ``d``, the keys of chunk ``c`` are
min-max normalised by the range of chunk ``c + 1``, and a token's score is the softmax, over its chunk,
of the standard deviation of its normalised channels, averaged between keys and values:

    x^_{j,d} = (x_{j,d} - min_{i in c+1} x_{i,d}) / (max_{i in c+1} x_{i,d} - min_{i in c+1} x_{i,d})
    s_j(X)  = softmax_{j in c}(std_d x^_{j,d}),        score_j = (s_j(K) + s_j(V)) / 2

Tokens that stand out relative to what follows carry information and are kept. The sinks and the last
chunk (which has no reference, together with the remainder that fills no chunk: ``L + (n - n_sink) mod L``
tokens) score 1, above every chunk score, so they are always kept.

Decisions (kvpress's unless stated):

* **Ranks, not values** (``cross_scoring: false``, the default): within each chunk the scores are replaced
  by their rank divided by ``L`` (in ``[0, 1)``), so every chunk keeps about the same number of tokens.
  Ties rank the earlier position lower (stable sort; kvpress's ``argsort`` leaves ties unspecified). With
  ``cross_scoring: true`` the softmax values are compared across chunks.
* **Short sequences** (fewer than ``n_sink + 2L`` valid tokens, no chunk has a reference): no lag score;
  sinks score 1 and the rest ``(rank - n_sink) / (n - n_sink)`` (recency), i.e. StreamingLLM.
* **Per row, on its valid entries**: chunks start at the first valid token of the row, so a left-padded
  row is cut exactly as the row alone (kvpress handles no padding).
* **Constant channels.** Where the reference chunk's range is 0 the channel is only shifted (divided by
  1), not divided by 0 (kvpress would produce NaN/inf there).
* fp32 throughout; ``std`` is the unbiased one (torch's default, as kvpress).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field
from torch import Tensor

from kvpolicy.policy import CompressionContext, Scorer

from kvpolicy_presses._rows import score_rows


class LagKV(Scorer):
    """LagKV: per-chunk std of keys and values min-max normalised by the next chunk; sinks and last chunk kept."""

    name: ClassVar[str] = "lagkv"
    paper: ClassVar[str] = "LagKV, Liang et al. 2025, arXiv:2504.04704"
    n_sink: int = Field(default=4, ge=0, description="first tokens always kept (score 1)")
    lag_size: int = Field(default=128, ge=2, description="chunk size L; chunk c is normalised by chunk c + 1")
    cross_scoring: bool = Field(default=False, description="compare softmax scores across chunks instead of ranks")

    def score(self, ctx: CompressionContext) -> Tensor:
        def one(r: int, j: int, idx: Tensor) -> Tensor:
            return self._score(ctx.keys[r, j, idx].float(), ctx.values[r, j, idx].float())

        return score_rows(ctx, one)

    def _score(self, keys: Tensor, values: Tensor) -> Tensor:
        """Scores ``[n]`` of one head's valid keys / values ``[n, D]``."""
        n, lag, sink = keys.shape[0], self.lag_size, self.n_sink
        out = torch.ones(n, dtype=torch.float32, device=keys.device)
        if n < sink + 2 * lag:  # no chunk has a reference: sinks, then recency
            if n > sink:
                out[sink:] = torch.arange(n - sink, device=keys.device, dtype=torch.float32) / (n - sink)
            return out
        n_chunks = (n - sink) // lag
        end = sink + (n_chunks - 1) * lag  # chunks before `end` are scored; the last chunk + remainder score 1
        chunked = [x[sink:sink + n_chunks * lag].reshape(n_chunks, lag, -1) for x in (keys, values)]
        score = (self._lag_score(chunked[0]) + self._lag_score(chunked[1])) / 2  # [n_chunks - 1, L]
        if not self.cross_scoring:
            order = torch.sort(score, dim=-1, stable=True).indices
            score = torch.sort(order, dim=-1, stable=True).indices.float() / lag  # rank within the chunk / L
        out[sink:end] = score.reshape(-1)
        return out

    @staticmethod
    def _lag_score(chunks: Tensor) -> Tensor:
        """``[C - 1, L]``: softmax over each chunk of the channel std of its entries normalised by the next
        chunk's per-channel range (``chunks [C, L, D]``)."""
        ref, target = chunks[1:], chunks[:-1]
        lo = ref.min(dim=1, keepdim=True).values  # [C-1, 1, D]
        span = ref.max(dim=1, keepdim=True).values - lo
        span = torch.where(span > 0, span, torch.ones_like(span))
        return ((target - lo) / span).std(dim=-1).softmax(dim=-1)
