"""Cascading KV cache (Willette et al., arXiv 2406.17808, "Training-Free Exponential Context Extension via
Cascading KV Cache"; code ``jeffwillette/cascading_cache_2``).

A sliding window (StreamingLLM) forgets every token once it leaves the window. The cascading cache splits the
same memory into ``C`` sub-caches (cascades) ``c_0 .. c_{C-1}`` after the sinks; a token that leaves ``c_i``
is offered to ``c_{i+1}``, which accepts only every ``k^{i+1}``-th step, so the deeper cascades hold tokens
from an exponentially longer past. At step ``u`` (the ``u``-th token after the sinks), the new token enters
``c_0``; the token offered to cascade ``i``:

    if u mod k^i == 0 (c_i is open):   append it; if c_i is full, its oldest token is offered to c_{i+1}
                                       (or dropped after the last cascade)
    else (c_i is closed):              if c_i is empty, append it; else it competes with the newest token
                                       of c_i and the one of lower score is dropped (ties: the offered one stays)

Scores are an exponential moving average of the attention each token receives:
``e_j <- beta e_j + (1 - beta) a_j`` after every query, ``a_j`` its attention averaged over the layer's query
heads. Within a cascade, positions stay in order, and every cascade holds older tokens than the one before:
the cache is the sinks plus contiguous runs of kept positions.

kvpolicy realises it as three steps (preset ``cascading``): the scorer ``cascade-ema`` (the EMA), the
selector ``cascading`` (the cascades, streamed token by token) and the decode rule ``cascading`` (a
compaction at every decoding step, once the cascade runs, with the last query kept for the EMA).

Decisions where the paper (and its code) are silent or do not fit a one-shot prefill:

* **One decision per layer.** The code keeps one score per layer (heads share the cascades); here too:
  ``a_j`` is the mean over all query heads, the selection is ``[B, 1, K]``.
* **Sizes.** The budget's total ``B`` (per row, resolved when the cascade starts: the prefill) holds the
  ``sink`` sinks and ``C`` cascades of ``floor((B - sink) / C)`` tokens, the remainder going to the first
  (most recent) cascades; cascades of size 0 are dropped. The sizes stay fixed afterwards (the paper's cache
  has a fixed size): a ratio budget's growth while decoding is not followed.
* **The prompt.** The prefill is one event: its tokens stream through the cascades in order, exactly as
  decoding would, but every comparison uses the EMA at the **end** of the prompt (the running EMA of each
  prompt step would need the whole ``L x L`` attention); the prompt's EMA is
  ``e_j = (1 - beta) sum_i beta^(p_last - p_i) a_ij`` over the prompt's queries ``i`` (full prefill attention;
  the paper's strided prefill attends to the cascade's contents).
* **While decoding** each step runs the scorer on the last query (``e <- beta e + (1 - beta) a``, the EMA
  carried in the layer's state, aligned by position) and streams the previous token through the cascades:
  the comparisons see the EMA including that token's own query (the code compares before it: one query
  fresher here).
* **Budget holds everything.** A row whose budget is at least its valid tokens keeps everything and starts no
  cascade (kvpolicy's rule: such a layer is left as it is); the cascade starts at the first event that
  exceeds the budget, streaming every token held.
* ``beta`` default 0.999 (the code's later value; its first version used ``0.01 ** (1 / W)``, ``W`` a cascade's
  size), ``accept_every`` ``k = 2``, ``cascades`` 4. With another selector, ``cascade-ema`` is an EMA scorer whose
  state is not carried between events (each event starts from 0).

Shapes: queries ``[B, H, Q, D]``, keys ``[B, Hkv, S, D]``, scores ``[B, 1, S]`` fp32, selection ``[B, 1, K]``.
The attention is computed by query chunks (``chunk x S``), never ``S x S``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from pydantic import Field
from torch import Tensor

from kvpolicy import observe, ops
from kvpolicy.policy import Compact, CompressionContext, DecodeRule, DecodeView, Scorer, Selection, Selector

STATE = "cascade"  # per-row cascade state (list of RowCascade | None)
EMA = "cascade_ema"  # (ema [B, 1, K], positions [B, 1, K] (-1 = filler), last query position [B])


# --------------------------------------------------------------------------------------------- the EMA
def weighted_attention(ctx: CompressionContext, weights: Tensor) -> Tensor:
    """``[B, 1, S]``: ``sum_i w_i a_ij``, ``a_ij`` query ``i``'s attention on entry ``j`` averaged over all query
    heads; ``weights [B, Q]`` (0 for queries that must not count)."""
    q = ctx._need_queries("the cascade's attention EMA")
    out = torch.zeros(ctx.shape[0], 1, ctx.shape[2], dtype=torch.float32, device=ctx.keys.device)
    qvalid = weights > 0
    for lo, probs, _ in observe._prob_chunks(q, ctx.keys, ctx.scaling, ctx.query_pos, ctx.positions, ctx.key_bias,
                                             qvalid, ops.DEFAULT_CHUNK_BYTES, ctx.form):
        c, n = probs.shape[3], probs.shape[4]
        w = weights[:, lo:lo + c].float()[:, None, None, :, None]  # [B, 1, 1, c, 1]
        out[:, 0, :n] += (probs * w).sum(3).mean(dim=(1, 2))  # sum over queries, mean over query heads
    return out


class CascadeEMA(Scorer):
    """Exponential moving average of the attention each entry receives (layer-shared, mean over query heads)."""

    name: ClassVar[str] = "cascade-ema"
    paper: ClassVar[str] = "Cascading KV cache, Willette et al., ICLR 2025, arXiv:2406.17808"
    observations: ClassVar[frozenset[str]] = frozenset({"window_attention"})
    beta: float = Field(default=0.999, gt=0.0, lt=1.0, description="EMA decay per query")

    def score(self, ctx: CompressionContext) -> Tensor:
        b, _, s = ctx.shape
        q = ctx._need_queries("the cascade's attention EMA")
        qpos = ctx.query_pos
        qvalid = ctx.query_valid if ctx.query_valid is not None else torch.ones(b, q.shape[2], dtype=torch.bool,
                                                                                 device=q.device)
        prev, last_prev = _aligned_previous(ctx)
        if last_prev is not None:
            qvalid = qvalid & (qpos > last_prev[:, None])  # queries already in the EMA are not counted twice
        last = torch.where(qvalid, qpos, -1).amax(-1)  # [B] last counted query position (-1: none)
        weights = torch.where(qvalid, (1 - self.beta) * torch.pow(torch.tensor(self.beta, dtype=torch.float64),
                                                                   (last[:, None] - qpos).double()), 0.0)
        ema = weighted_attention(ctx, weights) if bool(qvalid.any()) else torch.zeros(b, 1, s, device=ctx.keys.device)
        if prev is not None:
            steps = torch.where(last >= 0, last - last_prev, 0).clamp_min(0).double()
            ema = ema + prev * torch.pow(torch.tensor(self.beta, dtype=torch.float64), steps).float()[:, None, None]
            last = torch.maximum(last, last_prev)
        ctx.state[EMA + "_now"] = last
        return torch.where(ctx.valid[:, :1], ema, float("-inf"))


def _aligned_previous(ctx: CompressionContext) -> tuple[Tensor | None, Tensor | None]:
    """The EMA carried from the last event, aligned to this event's entries ``[B, 1, S]`` (new entries 0), and
    the last query position it includes ``[B]``; ``(None, None)`` when nothing (consistent) was carried."""
    carried = ctx.state.get(EMA)
    if carried is None:
        return None, None
    ema, pos, last = carried
    b, _, s = ctx.shape
    k = ema.shape[-1]
    if ema.shape[0] != b or k > s:
        return None, None
    here = ctx.positions[:, :1, :k].masked_fill(~ctx.valid[:, :1, :k], -1)
    if not torch.equal(here.to(pos.device), pos):
        ctx.figures["cascade_ema_reset"] = 1  # the layer changed since: start again
        return None, None
    out = torch.zeros(b, 1, s, dtype=torch.float32, device=ctx.keys.device)
    out[..., :k] = ema.to(out.device).masked_fill(pos < 0, 0.0)
    return out, last.to(ctx.keys.device)


# --------------------------------------------------------------------------------------------- the cascades
@dataclass
class RowCascade:
    """One row's cascades: positions (oldest first) per cascade, their capacities, the sinks, the stream count."""

    sizes: list[int]
    sink: int
    sinks: list[int] = field(default_factory=list)
    cascades: list[list[int]] = field(default_factory=list)
    streamed: int = 0  # valid tokens streamed so far (sinks included)
    last_pos: int = -1  # position of the last token streamed

    def __post_init__(self) -> None:
        if not self.cascades:
            self.cascades = [[] for _ in self.sizes]

    def kept(self) -> list[int]:
        return sorted(self.sinks + [p for c in self.cascades for p in c])

    def push(self, pos: int, score: dict[int, float], accept_every: int) -> None:
        """Stream the next token (position ``pos``) through the sinks and the cascades."""
        self.streamed += 1
        self.last_pos = pos
        if len(self.sinks) < self.sink:
            self.sinks.append(pos)
            return
        u = self.streamed - 1 - self.sink  # step index after the sinks
        token = pos
        for i, (c, cap) in enumerate(zip(self.cascades, self.sizes)):
            if u % (accept_every ** i) == 0:  # open
                c.append(token)
                if len(c) <= cap:
                    return
                token = c.pop(0)  # the oldest moves on
                continue
            if not c:  # closed but empty
                c.append(token)
                return
            if score[c[-1]] > score[token]:  # closed: the newest resident keeps its place
                return
            c[-1] = token
            return
        # fell off the last cascade: dropped


def cascade_sizes(total: int, sink: int, cascades: int) -> tuple[int, list[int]]:
    """``(sinks, sizes)`` for a row budget ``total``: ``C`` near-equal cascades (the remainder to the first),
    zero-size cascades dropped."""
    sink = min(sink, total)
    room = total - sink
    base, rem = divmod(room, cascades)
    return sink, [base + (1 if i < rem else 0) for i in range(cascades) if base + (1 if i < rem else 0) > 0]


class Cascading(Selector):
    """Cascading KV cache: sinks + cascades of sub-caches; cascade i accepts every k^i-th token, EMA competition."""

    name: ClassVar[str] = "cascading"
    paper: ClassVar[str] = "Cascading KV cache, Willette et al., ICLR 2025, arXiv:2406.17808"
    cascades: int = Field(default=4, ge=1, le=16, description="number of sub-caches C")
    accept_every: int = Field(default=2, ge=1, le=16, description="k: cascade i is open every k^i steps")

    def select(self, ctx: CompressionContext, scores: Tensor, priority: Tensor | None) -> Selection:
        b, _, s = ctx.shape
        valid = ctx.valid[:, 0]  # [B, S]
        layer_scores = torch.where(ctx.valid, scores, 0.0).sum(1) / ctx.valid.sum(1).clamp_min(1)  # [B, S] head mean
        rows = ctx.state.get(STATE)
        if not isinstance(rows, list) or len(rows) != b:
            rows = [None] * b
        kept_rows: list[list[int]] = []
        for r in range(b):
            idx = torch.nonzero(valid[r]).flatten()
            pos = ctx.positions[r, 0, idx].tolist()
            total = int(ctx.budget.total[r])
            row = rows[r]
            if row is not None and not set(row.kept()) <= set(pos):
                row = None  # the layer changed under the cascade (another step compacted it): start again
            if row is None and total >= len(pos):
                kept_rows.append(idx.tolist())  # the budget holds everything: no cascade yet
                continue
            sc = dict(zip(pos, layer_scores[r, idx].tolist()))
            if row is None:
                sink, sizes = cascade_sizes(total, ctx.budget.sink, self.cascades)
                row = RowCascade(sizes=sizes, sink=sink)
            for p in pos:
                if p > row.last_pos:
                    row.push(p, sc, self.accept_every)
            rows[r] = row
            where = dict(zip(pos, idx.tolist()))
            kept_rows.append([where[p] for p in row.kept()])
        ctx.state[STATE] = rows
        k = max(1, max(len(x) for x in kept_rows))
        indices = torch.zeros(b, 1, k, dtype=torch.long, device=ctx.keys.device)
        kept = torch.zeros(b, 1, k, dtype=torch.bool, device=ctx.keys.device)
        for r, x in enumerate(kept_rows):
            if x:
                indices[r, 0, :len(x)] = torch.tensor(x, dtype=torch.long)
                kept[r, 0, :len(x)] = True
        for r, x in enumerate(kept_rows):  # filler slots (kept False) repeat the row's last kept index
            if len(x) < k:
                indices[r, 0, len(x):] = x[-1] if x else 0
        now = ctx.state.pop(EMA + "_now", None)
        if now is not None:
            picked = layer_scores.gather(1, indices[:, 0]).unsqueeze(1)  # [B, 1, K]
            kept_pos = ctx.positions[:, :1].gather(2, indices).masked_fill(~kept, -1)
            ctx.state[EMA] = (picked.masked_fill(~kept, 0.0), kept_pos, now)
        ctx.figures["cascade_fill"] = [len(c) for c in rows[0].cascades] if rows[0] is not None else []
        return Selection(indices=indices, kept=kept)


class CascadingDecode(DecodeRule):
    """Cascading KV cache while decoding: once the cascade runs, one compaction per generated token."""

    name: ClassVar[str] = "cascading"
    paper: ClassVar[str] = "Cascading KV cache, Willette et al., ICLR 2025, arXiv:2406.17808"
    compacts: ClassVar[bool] = True
    query_window: int = Field(default=1, ge=1, description="recent queries kept (the EMA needs the last one)")

    def on_decode(self, view: DecodeView) -> Compact | None:
        rows = view.state.get(STATE)
        started = isinstance(rows, list) and any(r is not None for r in rows)
        return Compact() if started or view.length > view.target else None
