"""Shared tensor primitives used by the policy steps and the plugins.

Shapes follow the cache: keys and values are ``[batch, kv_heads, seq, head_dim]``; per-entry data
(scores, positions, validity) is ``[batch, heads, seq]`` where ``heads`` is ``kv_heads`` or ``1`` for
decisions shared by all heads of a layer. Scores and similarities are computed in fp32.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

COS_EPS = 1e-6
DEFAULT_CHUNK_BYTES = 32 * 1024 * 1024
#: similarities per chunk of :func:`cosine_argmax`, at most (2-8 MiB measured alike, 32 MiB slower)
COS_CHUNK_BYTES = 4 * 1024 * 1024


def chunk_rows(total: int, row_bytes: int, max_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Number of rows of ``row_bytes`` each that fit in ``max_bytes`` (at least 1, at most ``total``)."""
    return max(1, min(total, max_bytes // max(1, row_bytes)))


def expand_heads(idx: Tensor, heads: int) -> Tensor:
    """Broadcast ``[B, 1, K]`` (layer-shared) to ``[B, heads, K]``; per-head input is returned as is."""
    if idx.shape[1] == heads:
        return idx
    if idx.shape[1] != 1:
        raise ValueError(f"cannot broadcast {idx.shape[1]} heads to {heads}")
    return idx.expand(idx.shape[0], heads, *idx.shape[2:])


def gather_seq(x: Tensor, idx: Tensor) -> Tensor:
    """Gather entries along the sequence axis.

    Args:
        x: ``[B, H, S]`` or ``[B, H, S, D]``.
        idx: ``[B, H or 1, K]`` indices into ``S``.
    Returns:
        ``[B, H, K]`` or ``[B, H, K, D]``.
    """
    idx = expand_heads(idx, x.shape[1])
    if x.dim() == 3:
        return x.gather(2, idx)
    b, h, s, d = x.shape
    rows = _row_view(x)
    if rows is not None:  # whole rows of D: one index_select (a gather reads per element)
        if idx.numel() and bool(((idx < 0) | (idx >= s)).any()):
            raise IndexError(f"gather_seq: an index outside [0, {s}) (min {int(idx.min())}, max {int(idx.max())})")
        view, (rb, rh, rs) = rows
        at = idx * rs + (torch.arange(b, device=idx.device) * rb).view(b, 1, 1) \
            + (torch.arange(h, device=idx.device) * rh).view(1, h, 1)
        return view.index_select(0, at.reshape(-1)).view(*idx.shape, d)
    return x.gather(2, idx.unsqueeze(-1).expand(*idx.shape, d))


def _row_view(x: Tensor) -> tuple[Tensor, tuple[int, int, int]] | None:
    """``x [B, H, S, D]`` whose ``D`` axis is contiguous, as a ``[R, D]`` view of its storage, and the row
    strides of ``B``, ``H`` and ``S`` in it (rows may overlap: the view is only read). A key or value tensor laid
    out ``[S, H, D]`` and transposed (a serving engine's own step tensors) qualifies, as a contiguous one does.
    None for a tensor that needs gradients or whose ``D`` axis is strided."""
    if x.requires_grad or x.stride(-1) != 1 or x.numel() == 0:
        return None
    strides = [st for st, n in zip(x.stride()[:3], x.shape[:3]) if n > 1]
    g = math.gcd(*strides) if strides else x.shape[-1]
    if g < 1 or any(st % g for st in strides):
        return None
    last = sum((n - 1) * st for n, st in zip(x.shape[:3], x.stride()[:3])) // g
    view = x.as_strided((last + 1, x.shape[-1]), (g, 1))
    rb, rh, rs = (st // g if n > 1 else 0 for st, n in zip(x.stride()[:3], x.shape[:3]))
    return view, (rb, rh, rs)


def valid_rank(valid: Tensor) -> tuple[Tensor, Tensor]:
    """Rank of each valid entry among the valid entries of its row, and the count per row.

    Args:
        valid: ``[B, H, S]`` bool, entries in ascending position order.
    Returns:
        ``rank [B, H, S]`` (long, meaningless where invalid) and ``count [B, H]``.
    """
    csum = valid.long().cumsum(-1)
    return csum - 1, csum[..., -1]


def protected_mask(valid: Tensor, sink: int, recent: Tensor | int) -> Tensor:
    """Entries that a budget always keeps: the first ``sink`` and the last ``recent`` valid entries.

    Args:
        valid: ``[B, H, S]`` bool.
        recent: an int or a per-row ``[B]`` tensor of window sizes.
    """
    rank, count = valid_rank(valid)
    recent_t = torch.as_tensor(recent, device=valid.device).reshape(-1, 1, 1) if not isinstance(recent, int) else recent
    return valid & ((rank < sink) | (rank >= count.unsqueeze(-1) - recent_t))


def topk_keep(scores: Tensor, k: int, *, valid: Tensor, forced: Tensor | None = None,
              priority: Tensor | None = None, per_row: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Top-``k`` selection with forced entries, padding and deterministic ties.

    Ranking key, highest first: forced entries, then ``priority`` (if given), then ``scores``; ties go to
    the lower position (stable sort). Invalid entries (padding, fillers) rank last and are never marked kept.

    Args:
        scores: ``[B, H, S]`` fp32, higher = more important (``H`` may be 1 for layer-shared decisions).
        k: entries per row in the output (``<= S``).
        valid: ``[B, H or 1, S]`` bool.
        forced: ``[B, H or 1, S]`` bool, entries that must be kept.
        priority: ``[B, H or 1, S]`` integer-valued, compared before ``scores`` (e.g. LOOK-M's text prior).
        per_row: ``[B]`` long, how many entries each row really keeps (``<= k``), or ``[B, H]`` for a count
            per row and head (adaptive allocation); defaults to ``k``.
    Returns:
        ``indices [B, H, k]`` ascending along the last axis, and ``kept [B, H, k]`` bool: False marks a
        filler slot (row budget smaller than ``k`` or not enough valid entries).
    """
    b, h, s = scores.shape
    key = scores if scores.dtype == torch.float64 else scores.float()
    valid = valid.expand(b, h, s)
    key = torch.where(valid, key, torch.full_like(key, float("-inf")))
    if priority is None and k <= s and (per_row is None or bool((per_row >= k).all())):
        fast = _topk_set(key, k, None if forced is None else forced.expand(b, h, s) & valid)
        if fast is not None:
            return fast, valid.gather(-1, fast)
    if priority is not None:
        # lexicographic (priority, score): sort by score first, then stably by priority
        order = torch.sort(key, dim=-1, descending=True, stable=True).indices
        pri = priority.expand(b, h, s).to(torch.float64).gather(-1, order)
        pri = torch.where(valid.gather(-1, order), pri, torch.full_like(pri, float("-inf")))
        order = order.gather(-1, torch.sort(pri, dim=-1, descending=True, stable=True).indices)
    else:
        order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    if forced is not None:
        f = (forced.expand(b, h, s) & valid).gather(-1, order)
        order = order.gather(-1, torch.sort(f.to(torch.int8), dim=-1, descending=True, stable=True).indices)
    top = order[..., :k]
    rank_ok = torch.arange(k, device=scores.device).expand(b, h, k)
    limit = per_row.reshape(b, -1, 1) if per_row is not None else k
    kept = valid.gather(-1, top) & (rank_ok < limit)
    # ascending positions; fillers keep their slot order among themselves
    srt = torch.sort(top, dim=-1).indices
    return top.gather(-1, srt), kept.gather(-1, srt)


def _topk_set(key: Tensor, k: int, forced: Tensor | None) -> Tensor | None:
    """:func:`topk_keep`'s indices when only the kept set matters (no priority, every row keeps ``k``).

    The same set as the stable sorts (forced first, then the highest keys, ties to the lower position) from
    one ``topk`` and a threshold: entries above the ``k``-th largest key, then the lowest positions of those
    equal to it. ``None`` where this cannot decide (more forced entries than ``k``: their own order
    matters; a NaN key), and the caller sorts.
    """
    if forced is not None:
        if int(forced.sum(-1).max()) > k or bool(torch.isposinf(key).any()):
            return None
        key = key.masked_fill(forced, float("inf"))
    t = torch.topk(key, k, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)  # the k-th largest
    above = key > t
    tied = key == t
    need = k - above.sum(-1, keepdim=True)
    mask = above | (tied & (tied.cumsum(-1) <= need))
    if not bool((mask.sum(-1) == k).all()):
        return None
    b, h, _ = key.shape
    return mask.nonzero()[:, 2].view(b, h, k)  # row-major: ascending positions per row


def cosine_argmax(src: Tensor, dst: Tensor, *, dst_valid: Tensor | None = None,
                  max_bytes: int = DEFAULT_CHUNK_BYTES) -> tuple[Tensor, Tensor]:
    """For each source vector, the most cosine-similar destination vector (chunked over sources).

    Args:
        src: ``[B, H, E, D]``; dst: ``[B, H, K, D]``; dst_valid: ``[B, H, K]`` bool (invalid never chosen).
    Returns:
        ``argmax [B, H, E]`` (ties to the lowest index) and ``max [B, H, E]`` fp32 cosines.
    """
    b, h, e, _ = src.shape
    k = dst.shape[2]
    dn = dst.float()
    dn = (dn / dn.norm(dim=-1, keepdim=True).clamp_min(COS_EPS)).transpose(-1, -2)  # [B, H, D, K] view
    out_i = torch.empty(b, h, e, dtype=torch.long, device=src.device)
    out_v = torch.empty(b, h, e, dtype=torch.float32, device=src.device)
    # chunks of about COS_CHUNK_BYTES of similarities (at least 64 sources) in one buffer reused, the max
    # written in place: at 8k tokens, 0.2, 100 -> 65-73 ms per layer (fresh 32 MiB chunks page-fault)
    step = min(chunk_rows(e, b * h * k * 4, max_bytes), max(chunk_rows(e, b * h * k * 4, COS_CHUNK_BYTES), 64))
    sim_buf = torch.empty(b * h * min(step, e) * k, dtype=torch.float32, device=src.device)
    hidden = None if dst_valid is None else ~dst_valid.unsqueeze(2)
    for lo in range(0, e, step):
        hi = min(e, lo + step)
        sn = src[:, :, lo:hi].float()
        sn = sn / sn.norm(dim=-1, keepdim=True).clamp_min(COS_EPS)
        sim = torch.matmul(sn, dn, out=sim_buf[: b * h * (hi - lo) * k].view(b, h, hi - lo, k))
        if hidden is not None:
            sim.masked_fill_(hidden, float("-inf"))
        torch.max(sim, dim=-1, out=(out_v[:, :, lo:hi], out_i[:, :, lo:hi]))  # the first maximal index
    return out_i, out_v


def scatter_mean(target: Tensor, src: Tensor, index: Tensor, *, src_weight: Tensor | None = None,
                 self_weight: Tensor | float = 1.0, normalize: Tensor | None = None,
                 src_valid: Tensor | None = None) -> Tensor:
    """Fold sources into targets: ``t' = (w_t * t + sum_e w_e * s_e) / norm``, computed in fp32.

    With the defaults this is scatter-mean with self: ``(t + sum s_e) / (1 + n_t)``. Targets that receive
    nothing are returned unchanged (bit-identical after the cast back).

    Args:
        target: ``[B, H, K, D]``; src: ``[B, H, E, D]``; index: ``[B, H, E]`` into ``K``.
        src_weight: ``[B, H, E]`` weights of the sources (default 1).
        self_weight: scalar or ``[B, H, K]`` weight of each target (default 1).
        normalize: ``[B, H, K]`` divisor; default ``self_weight + n_t`` (the count, not the weights).
        src_valid: ``[B, H, E]`` bool; sources marked False (padding slots of a ragged evicted list,
            filtered-out entries) are ignored: they add nothing and are not counted in ``n_t``.
    Returns:
        ``[B, H, K, D]`` in the dtype of ``target``.
    """
    t = target.float()
    s = src.float()
    if src_weight is not None:
        s = s * src_weight.unsqueeze(-1)
    ones = torch.ones_like(index, dtype=torch.float32)
    if src_valid is not None:
        s = torch.where(src_valid.unsqueeze(-1), s, 0.0)
        ones = src_valid.float()
    sw = torch.as_tensor(self_weight, dtype=torch.float32, device=t.device)
    sw = sw.unsqueeze(-1) if sw.dim() == 3 else sw
    acc = t * sw
    acc = acc.scatter_add(2, index.unsqueeze(-1).expand_as(s), s)
    counts = torch.zeros(t.shape[:3], dtype=torch.float32, device=t.device)
    counts = counts.scatter_add(2, index, ones)
    if normalize is None:
        normalize = counts + (sw.squeeze(-1) if sw.dim() == 4 else sw)
    out = acc / normalize.unsqueeze(-1)
    touched = (counts > 0).unsqueeze(-1)
    return torch.where(touched, out.to(target.dtype), target)


def nearest_anchor(anchor_pos: Tensor, cand_pos: Tensor) -> Tensor:
    """Index of the positionally nearest anchor for each candidate, ties to the earlier anchor.

    Args:
        anchor_pos: ``[..., A]`` ascending positions; cand_pos: ``[..., C]`` positions.
    Returns:
        ``[..., C]`` indices into ``A``.
    """
    right = torch.searchsorted(anchor_pos.contiguous(), cand_pos.contiguous())
    right = right.clamp(max=anchor_pos.shape[-1] - 1)
    left = (right - 1).clamp(min=0)
    d_left = (cand_pos - anchor_pos.gather(-1, left)).abs()
    d_right = (anchor_pos.gather(-1, right) - cand_pos).abs()
    return torch.where(d_left <= d_right, left, right)
