"""Attention statistics that scorers ask for, computed in query chunks in fp32.

Nothing here materialises an ``L x L`` matrix for a whole layer: queries are processed in chunks whose
logits fit in :data:`kvpolicy.ops.DEFAULT_CHUNK_BYTES`, and the softmax probabilities are reduced
(summed over the chunk's queries) on the fly. Query heads are reduced to their KV head by the mean
over the group (GQA).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from kvpolicy.ops import DEFAULT_CHUNK_BYTES, chunk_rows

#: Logits per query chunk of the statistics (all heads of the batch), at most: small enough that a chunk's
#: ``Q·Kᵀ``, softmax, ``P·V`` and column reduction reuse it from the CPU's caches (measured:
#: ``benchmarks/fused_stat.py``), large enough that a chunk amortises its Python overhead. Measured at 8k
#: tokens (SmolLM2's heads, one KV head per product): a ``Q·Kᵀ`` writing 255 x 8 075 logits (8 MiB) runs at
#: 44 GFLOP/s, 96 x 8 075 at 71; the fused pass took 1.37-1.49x SDPA with 8 MiB, 1.21-1.35x with 2 MiB.
STAT_CHUNK_BYTES = 2 * 1024 * 1024
#: Queries per chunk of the statistics, at least: a chunk re-reads every key (and value) it sees, so a chunk of
#: few queries does little work per byte read (32k tokens: 7 queries per chunk cost 2.1x SDPA, 28 cost 1.6x).
MIN_CHUNK_QUERIES = 32
#: Logits of such a chunk for the KV heads scored together, at most (:func:`kv_head_groups`)
HEAD_GROUP_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class AttentionForm:
    """What a model's attention adds to ``softmax(scale · Q·Kᵀ + bias) · V``; every statistic here and the
    kvpolicy attention compute the same form, so a score is the attention the model really gives.

    - ``softcap``: logits become ``softcap · tanh(logits / softcap)`` before masking (Gemma 2).
    - ``sinks``: ``[H]`` fp32 learned logits, one per query head, that join each softmax's denominator and
      take their share of the probability mass without a value (gpt-oss's ``s_aux``).
    - ``window``: a query at position ``p`` sees entries at positions ``> p - window`` (sliding-window layers).
    """

    softcap: float | None = None
    sinks: Tensor | None = None
    window: int | None = None

    @property
    def plain(self) -> bool:
        return self.softcap is None and self.sinks is None and self.window is None

    def group(self, i: int, g: int) -> AttentionForm:
        """The form for KV head ``i``'s query group (``g`` query heads): its share of the sinks."""
        return self.kv_heads(slice(i, i + 1), g)

    def kv_heads(self, heads: slice, g: int) -> AttentionForm:
        """The form for the query groups of the KV heads ``heads`` (``g`` query heads each)."""
        if self.sinks is None:
            return self
        return AttentionForm(self.softcap, self.sinks[heads.start * g:heads.stop * g], self.window)


PLAIN = AttentionForm()


def kv_head_groups(batch: int, heads: int, kv_heads: int, entries: int, queries: int) -> list[slice]:
    """The KV heads whose statistics are computed together: as many as keep the logits of a chunk of
    :data:`MIN_CHUNK_QUERIES` queries (or of ``queries``, if fewer; every query head of the group, the whole
    batch) within :data:`HEAD_GROUP_BYTES`, at least one.

    A chunk's logits are written once and read by the softmax, ``P·V`` and the column sums; while they fit
    in the CPU's caches those passes cost little, beyond them each goes to memory (measured with
    ``benchmarks/fused_stat.py``, one thread, 9 query heads over 3 KV heads: at 32k tokens all heads together
    cost 1.70x SDPA, one KV head at a time 1.28x; at 8k 1.29x and 1.25x; at 2k, where every head fits,
    splitting only adds chunks: 1.12x and 1.22x)."""
    per_head = batch * (heads // max(1, kv_heads)) * entries * 4 * min(queries, MIN_CHUNK_QUERIES)
    n = max(1, min(kv_heads, HEAD_GROUP_BYTES // max(1, per_head)))
    return [slice(i, min(kv_heads, i + n)) for i in range(0, kv_heads, n)]


def _per_head_group(stat: Callable[..., Tensor], queries: Tensor, keys: Tensor, key_pos: Tensor,
                    key_bias: Tensor | None, form: AttentionForm, **kwargs: object) -> Tensor | None:
    """``[B, Hkv, S]``: the per-entry statistic ``stat`` (:func:`attention_colsum`, :func:`attention_colmax`) of
    each group of :func:`kv_head_groups` in turn; None when one group holds every head."""
    parts = _head_split(queries, keys, key_pos, key_bias, form)
    if not parts:
        return None
    out = torch.zeros(keys.shape[:3], dtype=torch.float32, device=keys.device)
    for hs, args in parts:
        out[:, hs] = stat(**args, **kwargs)
    return out


def _head_split(queries: Tensor, keys: Tensor, key_pos: Tensor, key_bias: Tensor | None, form: AttentionForm,
                values: Tensor | None = None) -> list[tuple[slice, dict[str, object]]]:
    """Per group of :func:`kv_head_groups` (none when one group holds every head): ``(KV heads, the arguments
    of a statistic restricted to them)``."""
    b, h, q = queries.shape[:3]
    hkv, s = keys.shape[1], keys.shape[2]
    groups = kv_head_groups(b, h, hkv, s, q)
    if len(groups) == 1:
        return []
    g = h // hkv

    def heads(t: Tensor, hs: slice) -> Tensor:  # a [B, 1, S] argument broadcasts over the heads
        return t if t.shape[1] == 1 else t[:, hs]

    parts = []
    for hs in groups:
        args: dict[str, object] = {"queries": queries[:, hs.start * g:hs.stop * g], "keys": keys[:, hs],
                                   "key_pos": heads(key_pos, hs), "form": form.kv_heads(hs, g),
                                   "key_bias": None if key_bias is None else heads(key_bias, hs)}
        if values is not None:
            args["values"] = values[:, hs]
        parts.append((hs, args))
    return parts


def attention_colsum(
    queries: Tensor,
    keys: Tensor,
    *,
    scaling: float,
    query_pos: Tensor,
    key_pos: Tensor,
    key_bias: Tensor | None = None,
    query_valid: Tensor | None = None,
    max_bytes: int = DEFAULT_CHUNK_BYTES,
    form: AttentionForm = PLAIN,
) -> Tensor:
    """Sum over queries of the attention each key receives (column sums of the softmax).

    Causality is taken from positions: query ``i`` sees entry ``j`` iff ``key_pos[j] <= query_pos[i]``.

    Args:
        queries: ``[B, H, Q, D]`` post-RoPE queries (``H = kv_heads * group``).
        keys: ``[B, Hkv, S, D]`` post-RoPE keys as cached.
        scaling: softmax scale (``1/sqrt(D)`` for most models).
        query_pos: ``[B, Q]`` logical positions of the queries.
        key_pos: ``[B, Hkv, S]`` logical positions of the entries.
        key_bias: ``[B, Hkv, S]`` fp32 additive logit bias (``-inf`` = invalid entry, ``log n`` = merged).
        query_valid: ``[B, Q]`` bool; invalid (padding) queries contribute nothing.
        form: soft-capping, sinks, window of the model's attention (:class:`AttentionForm`).
    Returns:
        ``[B, Hkv, S]`` fp32: per KV head, the mean over its query heads of the summed attention.
    """
    grouped = _per_head_group(attention_colsum, queries, keys, key_pos, key_bias, form, scaling=scaling,
                              query_pos=query_pos, query_valid=query_valid, max_bytes=max_bytes)
    if grouped is not None:
        return grouped
    out = torch.zeros(keys.shape[:3], dtype=torch.float32, device=keys.device)
    for _, probs, inv in _prob_chunks(queries, keys, scaling, query_pos, key_pos, key_bias, query_valid, max_bytes,
                                      form, deferred=True):
        out[..., : probs.shape[-1]] += group_colsum(probs, inv)
    return out


#: the last queries an estimate always reads in full (:func:`estimated_colsum`)
ESTIMATE_TAIL = 32
#: with the queries' log-sum-exp, the attention of each query to the entries this close (in positions) is
#: exact in an estimate; only the farther pairs are sampled
ESTIMATE_BAND = 64


def estimated_colsum(
    queries: Tensor,
    keys: Tensor,
    *,
    stride: int,
    scaling: float,
    query_pos: Tensor,
    key_pos: Tensor,
    key_bias: Tensor | None = None,
    query_valid: Tensor | None = None,
    form: AttentionForm = PLAIN,
    lse: Tensor | None = None,
    tail: int = ESTIMATE_TAIL,
    band: int = ESTIMATE_BAND,
) -> Tensor:
    """:func:`attention_colsum` estimated from a sample of the queries, at about ``1/stride`` of its cost.

    The sample is the last ``tail`` queries and every ``stride``-th query before them (counted back from the
    tail). Each entry's sum over the sampled queries that see it is scaled by how many valid queries see it
    over how many sampled ones do (a ratio estimate: an entry near the end, seen by few queries, is not
    scaled by ``stride``; one seen by every query is scaled by about ``stride``).

    With ``lse [B, H, Q]`` (each query's log-sum-exp over the entries, which the prefill attention's kernel
    returns; plain forms only), the attention of *every* query to the entries less than ``band`` positions
    back is exact (``exp(scale·q·k + bias - lse)``: the largest and most variable share, the local
    attention); only the pairs farther apart are estimated from the sample, with the same ratio.

    Same arguments and result as :func:`attention_colsum`; ``stride=1`` is the exact statistic.
    """
    q = queries.shape[2]
    if stride == 1:
        return attention_colsum(queries, keys, scaling=scaling, query_pos=query_pos, key_pos=key_pos,
                                key_bias=key_bias, query_valid=query_valid, form=form)
    t = min(q, tail)
    pick = torch.cat([torch.arange(q - t - 1, -1, -stride, device=queries.device).flip(0),
                      torch.arange(q - t, q, device=queries.device)])
    qv = None if query_valid is None else query_valid[:, pick]
    sorted_keys = bool((key_pos[..., 1:] >= key_pos[..., :-1]).all())
    near = 0 if lse is None or not form.plain or not sorted_keys else band
    blocked = bool(near) and _slots_are_positions(query_pos, key_pos, key_bias, query_valid)
    if blocked:  # positions are slots: both parts from one set of augmented keys (see _BlockedEstimate)
        est = _BlockedEstimate(queries, keys, lse, scaling, key_bias, query_valid, min(near, keys.shape[2]))
        sums = est.far(pick, query_pos[:, pick], key_pos)
    else:
        sums = torch.zeros(keys.shape[:3], dtype=torch.float32, device=keys.device)
        for lo, probs, _ in _prob_chunks(queries[:, :, pick], keys, scaling, query_pos[:, pick], key_pos, key_bias,
                                         qv, DEFAULT_CHUNK_BYTES, form):
            n = probs.shape[-1]
            if near:  # the band is exact below: the sample stands for the farther pairs only
                qp = query_pos[:, pick][:, lo:lo + probs.shape[3]]
                far = int((key_pos[..., :n] <= qp.min() - near).sum(-1).min())  # sorted: far from every query
                probs[..., far:].masked_fill_(key_pos[:, :, None, None, far:n] > qp[:, None, None, :, None] - near,
                                              0.0)
            sums[..., :n] += group_colsum(probs)
    every = _queries_seeing(query_pos, query_valid, key_pos + near)
    sampled = _queries_seeing(query_pos[:, pick], qv, key_pos + near)
    sums.mul_(every / sampled.clamp_min(1))
    if blocked:
        sums += est.band()
        if key_bias is not None:  # a hidden entry's clamped exp2 is tiny, not 0
            sums.masked_fill_(key_bias.isneginf(), 0.0)
    elif near:
        sums += _band_colsum(queries, keys, lse, scaling, query_pos, key_pos, key_bias, query_valid, near)
    return sums


def _band_colsum(queries: Tensor, keys: Tensor, lse: Tensor, scaling: float, query_pos: Tensor, key_pos: Tensor,
                 key_bias: Tensor | None, query_valid: Tensor | None, band: int, chunk: int = 128) -> Tensor:
    """``[B, Hkv, S]``: the exact attention every query gives the entries less than ``band`` positions before it
    (itself included), ``exp(scale·q·k + bias - lse)`` in query chunks over the slots a chunk's band can reach
    (entries sorted by position, the queries the last ``Q`` slots' or later)."""
    b, h, q, d = queries.shape
    hkv, s = keys.shape[1], keys.shape[2]
    g = h // hkv
    out = torch.zeros(b, hkv, s, dtype=torch.float32, device=keys.device)
    k32 = keys.detach().float()
    for lo in range(0, q, chunk):
        hi = min(q, lo + chunk)
        c = hi - lo
        k0, k1 = max(0, s - q + lo - band + 1), s - q + hi  # slots within reach of the chunk's bands
        qc = (queries[:, :, lo:hi].detach().float() * scaling).reshape(b, hkv, g * c, d)
        logits = torch.matmul(qc, k32[:, :, k0:k1].transpose(-1, -2)).view(b, hkv, g, c, k1 - k0)
        if key_bias is not None:
            logits.add_(key_bias[:, :, None, None, k0:k1])
        logits.sub_(lse[:, :, lo:hi].reshape(b, hkv, g, c, 1))
        kp, qp = key_pos[:, :, None, None, k0:k1], query_pos[:, None, None, lo:hi, None]
        outside = (kp > qp) | (kp <= qp - band)
        if query_valid is not None:
            outside = outside | ~query_valid[:, None, None, lo:hi, None]
        if key_bias is not None:
            outside = outside | key_bias[:, :, None, None, k0:k1].isneginf()
        # clamped first: exp is several times slower on arguments that underflow or overflow
        probs = logits.clamp_(-80.0, 80.0).exp_().masked_fill_(outside, 0.0)
        out[..., k0:k1] += group_colsum(probs)
    return out


def _slots_are_positions(query_pos: Tensor, key_pos: Tensor, key_bias: Tensor | None,
                         query_valid: Tensor | None) -> bool:
    """Whether, in every row, the valid entries' positions are their slots plus one offset and the valid queries
    (the last ``Q`` slots) sit at the positions of theirs: then "``band`` positions back" is "``band`` slots back"."""
    b, hkv, s = key_pos.shape
    q = query_pos.shape[1]
    if q > s:
        return False
    slots = torch.arange(s, device=key_pos.device)
    off = key_pos - slots  # [B, Hkv, S]
    qoff = query_pos - slots[s - q:]  # [B, Q]
    kv = torch.ones_like(off, dtype=torch.bool) if key_bias is None else ~key_bias.isneginf()
    qv = torch.ones_like(qoff, dtype=torch.bool) if query_valid is None else query_valid
    last = torch.where(qv, torch.arange(q, device=qv.device), 0).amax(-1, keepdim=True)  # a row's last valid query
    ref = qoff.gather(1, last)  # [B, 1]: its offset, which every valid query and entry must share
    return bool(((off == ref[:, :, None]) | ~kv).all() and ((qoff == ref) | ~qv).all())


#: queries per block of the blocked band (:class:`_BlockedEstimate`), and blocks per product: measured at 8k
#: tokens (SmolLM2's 9 heads, 1 thread), 16 x 64 and 32 x 16 take 22-25 ms per layer, 64 x 4 33 ms, the
#: position-masked band (:func:`_band_colsum`) 66-84 ms
BAND_BLOCK, BAND_GROUP = 16, 64
#: keys per product of the sampled far part (:meth:`_BlockedEstimate.far`): its logits stay in the CPU's cache
FAR_TILE = 1024
#: ``exp2`` is about 3.5x faster than ``exp`` on CPU: the augmented products give ``log2`` of the probability
_LOG2E = 1.4426950408889634
#: log2 arguments are clamped to this magnitude first: ``exp2`` is many times slower on arguments whose result
#: underflows or overflows (2^-115 is about exp(-80))
_LOG2_CLAMP = 115.0


class _BlockedEstimate:
    """The two parts of :func:`estimated_colsum` with the prefill's log-sum-exp where positions are slots
    (:func:`_slots_are_positions`), from augmented operands whose product is ``log2`` of the attention
    probability: queries ``(log2e·scale·q, -log2e·lse, log2e)`` and keys ``(k, 1, bias)``, so no pass over the
    logits subtracts, biases or normalises (the logits are read three times: exp2, mask, sum).

    - :meth:`band`: the queries in blocks of :data:`BAND_BLOCK`; a block reads the ``ceil(band / block) + 1`` key
      blocks that end with its own (``band + block`` logits per query for its ``band``), one mask for all blocks.
    - :meth:`far`: the sampled queries over the entries at least ``band`` positions back, in chunks that read the
      key prefix they can see, in tiles of :data:`FAR_TILE` keys (the logits transposed, ``[keys, g·queries]``).

    Dead queries (no finite log-sum-exp) and invalid ones weigh 0; ``-inf`` entries come out tiny, not 0
    (the caller zeroes them).
    """

    def __init__(self, queries: Tensor, keys: Tensor, lse: Tensor, scaling: float, key_bias: Tensor | None,
                 query_valid: Tensor | None, band: int) -> None:
        b, h, q, d = queries.shape
        hkv, s = keys.shape[1], keys.shape[2]
        self.g, self.c, self.width = h // hkv, BAND_BLOCK, band
        self.nb, self.nblk = -(-band // self.c), -(-q // self.c)
        self.queries, self.lse, self.scaling, self.query_valid = queries.detach(), lse.detach(), scaling, query_valid
        # keys [B, Hkv, rows, D + 2]: row r is slot r - lead (outside 0..S: a pad, (0, 0, -inf)); the band's
        # window of query block j starts at row s - q - nb c + lead + j c
        self.lead = max(0, self.nb * self.c - (s - q))
        rows = self.lead + s + (self.nblk * self.c - q)
        ka = torch.zeros(b, hkv, rows, d + 2, dtype=torch.float32, device=keys.device)
        ka[..., d + 1] = float("-inf")
        inner = ka[:, :, self.lead:self.lead + s]
        inner[..., :d] = keys.detach()
        inner[..., d] = 1.0
        inner[..., d + 1] = 0.0 if key_bias is None else key_bias.float()
        self.ka, self.inner = ka, inner

    def _queries(self, index: Tensor | slice, out: Tensor) -> Tensor:
        """Fill ``out [B, Hkv, n, g, D + 2]`` with the augmented queries at ``index``; ``[B, Hkv, n, g]`` live."""
        b, h, _, d = self.queries.shape
        hkv, g = h // self.g, self.g
        qs = self.queries[:, :, index]
        n = qs.shape[2]
        out[..., :d] = qs.view(b, hkv, g, n, d).transpose(2, 3)
        out[..., :d] *= self.scaling * _LOG2E
        nlse = self.lse[:, :, index].float().view(b, hkv, g, n).transpose(2, 3).neg()
        live = torch.isfinite(nlse)
        if self.query_valid is not None:
            live = live & self.query_valid[:, index][:, None, :, None]
        out[..., d + 1] = _LOG2E
        if bool(live.all()):
            out[..., d] = nlse.mul_(_LOG2E)
        else:
            out[..., d] = nlse.mul_(_LOG2E).masked_fill_(~live, 0.0)
            out[..., :d].masked_fill_(~live[..., None], 0.0)
        return live

    def band(self) -> Tensor:
        """``[B, Hkv, S]``: what :func:`_band_colsum` returns."""
        b, h, q, d = self.queries.shape
        g, c, nb, nblk, da = self.g, self.c, self.nb, self.nblk, d + 2
        hkv, rows = h // g, self.ka.shape[2]
        win = (nb + 1) * c
        dev = self.ka.device
        # query i of a block sees window column m iff 0 <= nb c + i - m < band; transposed [win, c g] (c-major)
        dist = nb * c + torch.arange(c, device=dev)[:, None] - torch.arange(win, device=dev)[None]
        mask = ((dist >= 0) & (dist < self.width)).float().t()[:, :, None].expand(win, c, g).reshape(win, c * g)
        first = rows - (nb + nblk) * c  # the row of the first block's window
        qa = torch.zeros(b, hkv, min(nblk, BAND_GROUP) * c, g, da, dtype=torch.float32, device=dev)
        out = torch.zeros(b, hkv, rows, dtype=torch.float32, device=dev)
        for j0 in range(0, nblk, BAND_GROUP):
            j1 = min(nblk, j0 + BAND_GROUP)
            q0, q1 = j0 * c, min(q, j1 * c)
            part = qa[:, :, : (j1 - j0) * c]
            if q1 - q0 < part.shape[2]:  # the last block's missing queries: rows (0, 0, log2e), weight 0
                part.zero_()
                part[..., d + 1] = _LOG2E  # (0 there would make 0 * -inf = NaN on a hidden entry)
            live = self._queries(slice(q0, q1), part[:, :, :q1 - q0])
            every = bool(live.all()) and q1 - q0 == part.shape[2]
            weight = None
            if not every:
                weight = torch.zeros(b, hkv, part.shape[2], g, dtype=torch.float32, device=dev)
                weight[:, :, :q1 - q0] = live
                weight = weight.view(b, hkv, j1 - j0, c * g, 1)
            blocks = part.view(b, hkv, j1 - j0, c * g, da)
            for bi in range(b):
                for hi in range(hkv):
                    # the key windows of the group's blocks overlap: one strided view, read in place (the
                    # logits transposed, [blocks, win, c g], so that the product needs no copy of it)
                    kh = self.ka[bi, hi]
                    kw = kh.as_strided((j1 - j0, win, da), (c * da, da, 1),
                                       kh.storage_offset() + (first + j0 * c) * da)
                    probs = torch.bmm(kw, blocks[bi, hi].transpose(1, 2))
                    probs.clamp_(-_LOG2_CLAMP, _LOG2_CLAMP).exp2_().mul_(mask)
                    sums = _row_sums(probs, None if weight is None else weight[bi, hi])
                    # block j's window is rows first + (j + t) c ...: add it block by block
                    for t in range(nb + 1):
                        lo = first + (j0 + t) * c
                        out[bi, hi, lo:lo + (j1 - j0) * c].view(j1 - j0, c).add_(sums[:, t * c:(t + 1) * c])
        s = self.inner.shape[2]
        return out[..., self.lead:self.lead + s].div_(g)

    def far(self, pick: Tensor, pick_pos: Tensor, key_pos: Tensor) -> Tensor:
        """``[B, Hkv, S]``: the sampled queries' (``pick``, positions ``pick_pos [B, P]``) attention summed over them
        for the entries at least ``band`` positions before each, 0 for the nearer ones (the band's)."""
        b, h, _, d = self.queries.shape
        g, da, p = self.g, d + 2, pick.numel()
        hkv, s = h // g, self.inner.shape[2]
        dev = self.ka.device
        # [B, Hkv, g, P, D + 2]: a chunk's rows head-major (copied per chunk, small), so that the near mask
        # broadcasts over the heads with the queries innermost
        qa = torch.empty(b, hkv, g, p, da, dtype=torch.float32, device=dev)
        live = self._queries(pick, qa.transpose(2, 3)).transpose(2, 3)  # [B, Hkv, g, P]
        every = bool(live.all())
        keys = self.inner.reshape(b * hkv, s, da)
        sums = torch.zeros(b, hkv, s, dtype=torch.float32, device=dev)
        step = MIN_CHUNK_QUERIES
        buf = torch.empty(b * hkv * FAR_TILE * step * g, dtype=torch.float32, device=dev)
        # per chunk: the entries far from some query of it (n) and from every query of it (n_all, unmasked)
        bounds = _chunk_prefixes(pick_pos - self.width, key_pos, step, windowed=False)
        for lo, (n, n_all) in zip(range(0, p, step), bounds):
            hi = min(p, lo + step)
            c = hi - lo
            qc = qa[:, :, :, lo:hi].reshape(b * hkv, g * c, da).transpose(1, 2)
            weight = None if every else live[:, :, :, lo:hi].float().reshape(b * hkv, g * c, 1)
            for t0 in range(0, n, FAR_TILE):
                t1 = min(n, t0 + FAR_TILE)
                probs = buf[: b * hkv * (t1 - t0) * c * g].view(b * hkv, t1 - t0, c * g)
                torch.bmm(keys[:, t0:t1], qc, out=probs)
                probs.clamp_(-_LOG2_CLAMP, _LOG2_CLAMP).exp2_()
                if t1 > n_all:  # entries within the band of some query of the chunk (or after it): not far
                    m0 = max(t0, n_all)
                    near = key_pos[:, :, m0:t1, None] > pick_pos[:, None, None, lo:hi] - self.width
                    probs.view(b, hkv, t1 - t0, g, c)[:, :, m0 - t0:].masked_fill_(near[:, :, :, None], 0.0)
                part = _row_sums(probs, weight)
                sums.view(b * hkv, s)[:, t0:t1] += part
        return sums.div_(g)


def _row_sums(probs: Tensor, weight: Tensor | None) -> Tensor:
    """``[N, R, C] -> [N, R]``: each row summed over its ``C`` queries, or weighted by ``weight [N, C, 1]``."""
    return probs.sum(-1) if weight is None else torch.bmm(probs, weight).squeeze(-1)


def _queries_seeing(query_pos: Tensor, query_valid: Tensor | None, key_pos: Tensor) -> Tensor:
    """``[B, Hkv, S]`` fp32: how many valid queries (``[B, Q]`` positions) are at or after each entry's position."""
    pos = query_pos if query_valid is None else query_pos.masked_fill(~query_valid, torch.iinfo(query_pos.dtype).min)
    pos = pos.sort(dim=-1).values.contiguous()
    b, hkv, s = key_pos.shape
    before = torch.searchsorted(pos, key_pos.reshape(b, hkv * s).contiguous(), right=False)
    return (pos.shape[-1] - before).view(b, hkv, s).float()


def _head_matmul(a: Tensor, b: Tensor, out: Tensor) -> Tensor:
    """``out[..., m, n] = a[..., m, k] @ b[..., k, n]`` over the leading (batch, KV head) axes.

    With several threads and a batch count they cannot share evenly (3 KV heads on 2 threads: one thread
    takes 2 heads, the other 1), one 2-D product per head instead, each split over all the threads."""
    lead = a.shape[:-2]
    count = a.shape[:-2].numel()
    threads = torch.get_num_threads()
    if threads == 1 or count % threads == 0 or a.device.type != "cpu":
        return torch.matmul(a, b, out=out)
    a2, b2 = a.reshape(count, *a.shape[-2:]), b.expand(*lead, *b.shape[-2:]).reshape(count, *b.shape[-2:])
    o2 = out.view(count, *out.shape[-2:])
    for i in range(count):
        torch.mm(a2[i], b2[i], out=o2[i])
    return out


def group_colsum(probs: Tensor, inv: Tensor | None = None) -> Tensor:
    """``[B, Hkv, g, c, n]`` probabilities -> ``[B, Hkv, n]``: summed over the chunk's queries (one
    matrix-vector product per query head, a single read of the chunk), then averaged over the group's
    query heads (so a group of identical heads gives exactly its head's sums). With ``inv [B, Hkv, g, c, 1]``,
    ``probs`` are unnormalised and each query's row is weighted by its ``inv`` in the same product."""
    w = probs.new_ones((1, 1, 1, 1, probs.shape[3])) if inv is None else inv.transpose(-1, -2)
    return torch.matmul(w, probs).squeeze(3).mean(dim=2)


def attention_with_colsum(
    queries: Tensor,
    keys: Tensor,
    values: Tensor,
    *,
    scaling: float,
    query_pos: Tensor,
    key_pos: Tensor,
    key_bias: Tensor | None = None,
    query_valid: Tensor | None = None,
    max_bytes: int = DEFAULT_CHUNK_BYTES,
    form: AttentionForm = PLAIN,
    sums: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """The attention output and :func:`attention_colsum` from one pass over the probabilities.

    A prefill whose scorer needs the accumulated attention of every query (H2O, LOOK-M, Elastic Cache,
    KVMerger) would otherwise compute ``Q·Kᵀ`` and the softmax twice: once inside SDPA, once for the
    statistic. Here each fp32 query chunk's probabilities give both ``probs @ V`` and their column sums.
    Same arguments as :func:`attention_colsum`, plus ``values [B, Hkv, S, Dv]``; ``sums=False`` skips the
    statistic (the attention alone, for a model form SDPA cannot compute: soft-capping, sinks).

    Returns:
        ``([B, H, Q, Dv]`` output in the queries' dtype (0 for invalid queries), ``[B, Hkv, S]`` fp32 sums or
        None).
    """
    b, h, q, _ = queries.shape
    hkv, dv = values.shape[1], values.shape[-1]
    g = h // hkv
    out = torch.empty(b, hkv, g, q, dv, dtype=queries.dtype, device=queries.device)
    acc = torch.zeros(keys.shape[:3], dtype=torch.float32, device=keys.device) if sums else None
    parts = _head_split(queries, keys, key_pos, key_bias, form, values)
    for hs, args in parts:
        o, a = attention_with_colsum(**args, scaling=scaling, query_pos=query_pos,  # type: ignore[arg-type]
                                     query_valid=query_valid, max_bytes=max_bytes, sums=sums)
        out[:, hs] = o.view(b, hs.stop - hs.start, g, q, dv)
        if acc is not None and a is not None:
            acc[:, hs] = a
    if parts:
        return out.view(b, h, q, dv), acc
    v32 = values.detach().float()
    pv_buf: Tensor | None = None  # one chunk's P·V in fp32, reused
    for lo, probs, inv in _prob_chunks(queries, keys, scaling, query_pos, key_pos, key_bias, query_valid, max_bytes,
                                       form, deferred=True):
        c, n = probs.shape[3], probs.shape[4]
        # [B, Hkv, g*c, n] @ [B, Hkv, n, Dv]: one matmul per KV head, no broadcast over the group
        if pv_buf is None:
            pv_buf = torch.empty(b * hkv * g * c * dv, dtype=torch.float32, device=keys.device)
        pv = pv_buf[: b * hkv * g * c * dv].view(b, hkv, g * c, dv)
        _head_matmul(probs.view(b, hkv, g * c, n), v32[:, :, :n], out=pv)
        if inv is not None:  # the softmax's division, on the [c, Dv] output instead of the [c, n] probabilities
            pv.view(b, hkv, g, c, dv).mul_(inv)
        out[:, :, :, lo: lo + c] = pv.view(b, hkv, g, c, dv)
        if acc is not None:
            acc[..., :n] += group_colsum(probs, inv)
    return out.view(b, h, q, dv), acc


def _prob_chunks(queries: Tensor, keys: Tensor, scaling: float, query_pos: Tensor, key_pos: Tensor,
                 key_bias: Tensor | None, query_valid: Tensor | None, max_bytes: int,
                 form: AttentionForm = PLAIN, *, deferred: bool = False
                 ) -> Iterator[tuple[int, Tensor, Tensor | None]]:
    """``(first query index, softmax probabilities [B, Hkv, group, q_chunk, S'] fp32, None)``, one query chunk
    at a time (0 where a query is invalid or sees nothing).

    ``deferred`` (a caller that reduces the probabilities linearly: ``P·V``, column sums), for a form without
    soft-capping or sinks: the probabilities come unnormalised, ``2^(l·log2e - max)`` (``exp2`` is faster than
    the softmax's ``exp``, and no pass divides ``[c, S']``), with each row's reciprocal sum ``[B, Hkv, group,
    q_chunk, 1]`` (0 for an invalid or dead query) in place of None.

    Entries are kept in ascending position order, so the keys a chunk can see form a prefix: ``S'`` is
    the length of that prefix (keys after it are invisible to every query of the chunk), which skips
    the upper triangle of a causal prefill (about half the work). ``form`` adds soft-capping, sinks and a
    window (:class:`AttentionForm`).
    """
    b, h, q, d = queries.shape
    hkv, s = keys.shape[1], keys.shape[2]
    g = h // hkv
    queries = queries.detach()  # statistics, never differentiated
    kt = keys.detach().to(torch.float32).transpose(-1, -2)
    # at least 8 chunks (of >= 32 queries): each chunk scores only the key prefix it sees, so a few
    # queries spread over the whole sequence (a strided estimate) still skip most of the causal triangle
    # chunks of STAT_CHUNK_BYTES, but of >= MIN_CHUNK_QUERIES queries (within max_bytes)
    row = b * h * s * 4
    step = min(chunk_rows(q, row, max_bytes), max(chunk_rows(q, row, STAT_CHUNK_BYTES), MIN_CHUNK_QUERIES),
               max(MIN_CHUNK_QUERIES, -(-q // 8)))
    if step < q:  # keys transposed once, [B, Hkv, D, S]: every chunk's Q·Kᵀ reads a prefix of contiguous rows
        kt = kt.contiguous()  # (one chunk, e.g. an observation window, multiplies by the transposed view)
    # Buffers reused by every chunk (scaled queries, logits; the softmax runs in place): a fresh multi-MiB
    # tensor per chunk costs more in page faults than the softmax itself on CPU, and one logits buffer
    # instead of two halves the working set. The yielded tensor is a view of it, valid until the next chunk.
    q_buf = torch.empty(b * h * step * d, dtype=torch.float32, device=keys.device)
    logits_buf = torch.empty(b * h * step * s, dtype=torch.float32, device=keys.device)
    sinks = None if form.sinks is None else form.sinks.detach().float().view(1, hkv, g, 1, 1)
    deferred = deferred and form.softcap is None and sinks is None
    if deferred:  # logits in log2 units: the scale and the bias times log2e
        scaling = scaling * _LOG2E
        key_bias = None if key_bias is None else key_bias * _LOG2E
    bounds = _chunk_prefixes(query_pos, key_pos, step, windowed=form.window is not None)
    for lo, (n, n_all) in zip(range(0, q, step), bounds):
        hi = min(q, lo + step)
        c = hi - lo
        qc = q_buf[: b * h * c * d].view(b, h, c, d)
        qc.copy_(queries[:, :, lo:hi]).mul_(scaling)  # fp32 first, then the scale (as queries.float() * scaling)
        logits = logits_buf[: b * h * c * n].view(b, hkv, g * c, n)
        _head_matmul(qc.view(b, hkv, g * c, d), kt[..., :n], out=logits)
        logits = logits.view(b, hkv, g, c, n)
        if form.softcap is not None:  # before the bias and the mask, as the models apply it
            logits.div_(form.softcap).tanh_().mul_(form.softcap)
        if key_bias is not None:
            logits.add_(key_bias[:, :, None, None, :n])
        if n_all < n:  # causal mask on the columns some query of the chunk must not see (the diagonal block)
            kp, qp = key_pos[:, :, None, None, n_all:n], query_pos[:, None, None, lo:hi, None]
            hidden = kp > qp
            if form.window is not None:
                hidden |= kp <= qp - form.window
            logits[..., n_all:n].masked_fill_(hidden, float("-inf"))
        inv = None
        if deferred:
            probs = logits.sub_(logits.amax(dim=-1, keepdim=True)).exp2_()
            inv = probs.sum(dim=-1, keepdim=True).reciprocal_()  # NaN for an all -inf row
            dead = inv.isnan()
        else:
            probs = softmax_with_sinks(logits, sinks, out=logits)
            dead = probs[..., :1].isnan()  # [B, Hkv, g, c, 1]: a query that sees nothing (an all -inf row)
        if query_valid is not None:
            dead = dead | ~query_valid[:, None, None, lo:hi, None]
        if bool(dead.any()):
            probs.masked_fill_(dead, 0.0)
            if inv is not None:
                inv.masked_fill_(dead, 0.0)
        yield lo, probs, inv


def _chunk_prefixes(query_pos: Tensor, key_pos: Tensor, step: int, *, windowed: bool) -> list[tuple[int, int]]:
    """Per query chunk of ``step`` queries: ``(n, n_all)``, the key prefix some query of the chunk sees and the
    leading entries every query of it sees, for all chunks at once (one sync instead of several per chunk).

    Shortcuts need the entries in ascending position order in every row (checked once); otherwise every chunk
    scores all ``S`` entries and masks them all. A window hides leading entries from later queries, so then
    ``n_all = 0`` (every column is masked)."""
    b, q = query_pos.shape
    s = key_pos.shape[-1]
    chunks = -(-q // step)
    if s == 0 or q == 0:
        return [(max(1, s), 0)] * chunks
    rows = key_pos.reshape(-1, s)
    if s > 1 and not bool((rows[:, 1:] >= rows[:, :-1]).all()):
        return [(s, 0)] * chunks  # positions not sorted: no prefix shortcuts
    pad = chunks * step - q
    qp = query_pos if not pad else torch.cat([query_pos, query_pos[:, -1:].expand(b, pad)], dim=1)
    qp = qp.view(b, chunks, step)
    first, last = qp.amin(dim=(0, 2)), qp.amax(dim=(0, 2))  # [chunks]: over the batch, as one chunk is scored
    probe = torch.cat([last, first]).to(rows.dtype)  # [2 * chunks]
    seen = torch.searchsorted(rows.contiguous(), probe.expand(rows.shape[0], -1).contiguous(), right=True)
    n = seen[:, :chunks].amax(0).clamp_min(1)  # [chunks]: entries some query of the chunk sees, in some row
    n_all = torch.zeros_like(n) if windowed else seen[:, chunks:].amin(0)
    return list(zip(n.tolist(), n_all.tolist()))


def softmax_with_sinks(logits: Tensor, sinks: Tensor | None, *, out: Tensor) -> Tensor:
    """Softmax over the last axis of ``logits [B, Hkv, g, q, n]`` into ``out``; ``sinks [1, Hkv, g, 1, 1]`` (or None)
    join each denominator without a value: ``p_j = exp(l_j - m) / (sum_k exp(l_k - m) + exp(sink - m))``. A row
    whose logits are all ``-inf`` gives NaN without sinks (callers zero it), 0 with them."""
    if sinks is None:
        return torch.softmax(logits, dim=-1, out=out)
    m = torch.maximum(logits.amax(dim=-1, keepdim=True), sinks)
    probs = torch.exp(torch.sub(logits, m, out=out), out=out)
    return probs.div_(probs.sum(dim=-1, keepdim=True) + torch.exp(sinks - m))


def attention_colmax(
    queries: Tensor,
    keys: Tensor,
    *,
    scaling: float,
    query_pos: Tensor,
    key_pos: Tensor,
    key_bias: Tensor | None = None,
    query_valid: Tensor | None = None,
    max_bytes: int = DEFAULT_CHUNK_BYTES,
    form: AttentionForm = PLAIN,
) -> Tensor:
    """Max over queries (and over the query heads of each KV group) of the attention each key receives.

    Same arguments and chunking as :func:`attention_colsum`; KVzip's reconstruction score uses it.
    Returns ``[B, Hkv, S]`` fp32 (0 for keys no valid query sees).
    """
    grouped = _per_head_group(attention_colmax, queries, keys, key_pos, key_bias, form, scaling=scaling,
                              query_pos=query_pos, query_valid=query_valid, max_bytes=max_bytes)
    if grouped is not None:
        return grouped
    out = torch.zeros(keys.shape[:3], dtype=torch.float32, device=keys.device)
    for _, probs, _ in _prob_chunks(queries, keys, scaling, query_pos, key_pos, key_bias, query_valid, max_bytes,
                                    form):
        n = probs.shape[-1]
        out[..., :n] = torch.maximum(out[..., :n], probs.amax(dim=(2, 3)))
    return out


def key_norms(keys: Tensor) -> Tensor:
    """L2 norm of each cached key, ``[B, Hkv, S, D] -> [B, Hkv, S]`` fp32."""
    return keys.float().norm(dim=-1)
