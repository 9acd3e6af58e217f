"""Expected Attention (Devoto et al., arXiv 2510.00636; kvpress ``ExpectedAttentionPress``).

Future queries are unknown at the end of the prefill, but their distribution can be estimated: fit a
Gaussian ``q ~ N(mu, Sigma)`` to the prompt's queries *before* RoPE, move it to the next ``n`` positions
with the rotation averaged over them, ``R_bar = mean_{t = T .. T+n-1} R(t)`` (``T`` = the first future
position), and score each key by the attention such a query would give it. For a Gaussian query the
expected logit exponential has a closed form (log-normal mean):

    E[exp(s q . k)] = exp(s k . mu_f + s^2 / 2 k^T Sigma_f k),   mu_f = R_bar mu,  Sigma_f = R_bar Sigma R_bar^T

    score_j = (softmax_j(s k_j . mu_f + s^2 / 2 k_j^T Sigma_f k_j) + eps) * ||v_j||_2

with ``s`` the attention scale (``1/sqrt(D)``), the softmax over the non-sink entries, per query head,
then averaged over the query heads of each KV head (GQA).

Decisions (kvpress's where it has one):

* **Which queries.** Every valid query of the event except those at the first ``n_sink`` positions
  (kvpress: the prefill's queries after the first ``n_sink`` tokens, which hold outliers); ``window: w``
  uses the last ``w`` of them instead. Mean and covariance are per query head, the covariance divided by
  the number of queries (biased, as kvpress).
* **Pre-RoPE queries from post-RoPE ones.** The context holds the queries after RoPE (``q~_i = R(p_i)
  q_i``); ``R(T) q_i = R(T - p_i) q~_i``, so each query is rotated by its *offset* to ``T`` and the
  statistics are taken there: ``R(T) mu`` and ``R(T) Sigma R(T)^T``. Then ``mean_{d < n} R(d)`` moves them to
  ``T .. T+n-1``, which equals kvpress's ``R_bar mu`` (rotations commute). Only differences of positions are
  used, so a left-padded row scores exactly as the row alone. This needs the model's RoPE frequencies,
  which the context does not carry: ``rope_theta`` (default 100000, the embedded SmolLM2's
  ``rope_theta``; set it to your model's ``config.rope_theta``) with transformers' default rope type and
  ``rotate_half`` layout. Scaled RoPE variants (Llama-3, YaRN) and partial rotary are not modelled.
* **Scale.** ``s = ctx.scaling`` (the model's softmax scale); kvpress uses ``1/sqrt(D)``, the same on
  Llama-family models.
* **Sinks.** The first ``n_sink`` valid entries are not scored; they get ``max + 1`` of their head
  (kvpress pads them with the global max + 1) and the presets keep them with ``budget.sink: 4`` too.
* **Future positions.** ``T`` = the last valid query position + 1 (kvpress: the prompt length).
* Computed in fp32 (the rotation in fp64), by chunks of keys for the quadratic form; nothing is
  ``S x S``: the statistics are ``[g, D, D]`` per KV head.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field
from torch import Tensor

from kvpolicy import ops
from kvpolicy.policy import CompressionContext, Scorer

from kvpolicy_presses._rows import inv_freq, mean_rotation, rotate, score_rows


class ExpectedAttention(Scorer):
    """Expected attention of future queries (Gaussian fit of the prompt's queries, averaged RoPE), times ||v||."""

    name: ClassVar[str] = "expected-attention"
    paper: ClassVar[str] = "Expected Attention, Devoto et al. 2025, arXiv:2510.00636"
    comparable: ClassVar[bool] = True  # attention masses: one scale across heads and layers
    observations: ClassVar[frozenset[str]] = frozenset({"queries"})
    n_future_positions: int = Field(default=512, ge=1, description="future positions the rotation is averaged over")
    n_sink: int = Field(default=4, ge=0, description="first entries (and queries) left out of the statistics")
    use_covariance: bool = Field(default=True, description="add the covariance term s^2/2 k^T Sigma k")
    use_vnorm: bool = Field(default=True, description="multiply by the value norm ||v||_2")
    epsilon: float = Field(default=0.0, ge=0.0, description="added to the expected attention before ||v||")
    window: int | None = Field(default=None, ge=1,
                               description="statistics from the last `window` queries (None: every query after the sinks)")
    rope_theta: float = Field(default=100000.0, gt=0.0,
                              description="the model's RoPE base (config.rope_theta); 100000 = embedded SmolLM2")

    def score(self, ctx: CompressionContext) -> Tensor:
        queries = ctx._need_queries("expected attention")  # [B, H, Q, D]
        hkv = ctx.shape[1]
        g = queries.shape[1] // hkv
        freq = inv_freq(queries.shape[-1], self.rope_theta, queries.device)
        m_future = mean_rotation(self.n_future_positions, freq, queries.shape[-1]).to(queries.device).float()  # [D, D]

        def one(r: int, j: int, idx: Tensor) -> Tensor:
            keys = ctx.keys[r, j, idx].float()  # [n, D]
            pos = ctx.positions[r, j, idx]
            qv = ctx.query_valid[r] if ctx.query_valid is not None else torch.ones_like(ctx.query_pos[r], dtype=torch.bool)
            qidx = torch.nonzero(qv).flatten()
            qpos = ctx.query_pos[r, qidx]
            keep = qpos >= pos.min() + self.n_sink  # not a sink position
            if bool(keep.any()):
                qidx, qpos = qidx[keep], qpos[keep]
            if self.window is not None:
                qidx, qpos = qidx[-self.window:], qpos[-self.window:]
            q = queries[r, j * g:(j + 1) * g, qidx].float()  # [g, N, D] post-RoPE
            n_sink = min(self.n_sink, keys.shape[0] - 1)  # at least one entry is scored
            return self._score(q, qpos, keys[n_sink:], ctx.values[r, j, idx[n_sink:]].float(), n_sink,
                               ctx.scaling, freq, m_future)

        return score_rows(ctx, one)

    def _score(self, q: Tensor, qpos: Tensor, keys: Tensor, values: Tensor, n_sink: int, scale: float,
               freq: Tensor | None, m_future: Tensor) -> Tensor:
        """Scores ``[n_sink + n]`` of one KV head from its group's post-RoPE queries ``q [g, N, D]`` at ``qpos [N]``
        and its non-sink keys / values ``[n, D]``."""
        g, n_q, d = q.shape
        if n_q:
            start = qpos.max() + 1  # first future position
            at_start = rotate(q, start - qpos, freq)  # [g, N, D]: every query moved to position `start`
            mu = at_start.mean(dim=1)  # [g, D]
            centered = at_start - mu[:, None]
            cov = centered.transpose(1, 2) @ centered / n_q  # [g, D, D]
        else:  # no query: a zero-mean, zero-covariance guess (uniform expected attention)
            mu = q.new_zeros(g, d)
            cov = q.new_zeros(g, d, d)
        mu_f = mu @ m_future.T  # [g, D]
        logits = scale * (keys @ mu_f.T).T  # [g, n]
        if self.use_covariance:
            cov_f = m_future @ cov @ m_future.T  # [g, D, D]
            step = ops.chunk_rows(keys.shape[0], g * d * 4)
            quad = torch.cat([((keys[lo:lo + step] @ cov_f) * keys[lo:lo + step]).sum(-1)  # [g, chunk]
                              for lo in range(0, keys.shape[0], step)], dim=-1)
            logits = logits + 0.5 * scale * scale * quad
        scores = logits.softmax(dim=-1).mean(dim=0)  # [n]: expected attention, group mean
        if self.use_vnorm:
            scores = (scores + self.epsilon) * values.norm(dim=-1)
        sink = scores.new_full((n_sink,), float(scores.max()) + 1.0)
        return torch.cat((sink, scores))
