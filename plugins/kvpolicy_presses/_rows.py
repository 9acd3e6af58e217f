"""What the presses share: scoring one (row, KV head) at a time on its valid entries, and RoPE offsets.

Every press scores the valid entries of a row as if the row were alone: the entries are compacted
(pads and fillers dropped, order kept), scored, and scattered back. So a row left-padded in a batch
runs the very same computation on the very same tensors as the row alone, which makes batch
independence exact rather than approximate (statistics such as means, chunk boundaries or an SVD
would otherwise see the pads or shift with them).

RoPE here is transformers' ``rotate_half`` layout (Llama, Mistral, Qwen, Gemma...): pair ``k`` of a
head is the coordinates ``(k, k + D/2)``, rotated by ``position * inv_freq[k]`` with
``inv_freq[k] = theta ** (-2k / D)``. Rotations are applied by *offset* (a difference of positions), never
by absolute position, so a constant shift of every position (left padding, a different first position)
changes nothing. An odd head dimension has no such layout: vectors are then used as they are (no rotation).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from kvpolicy.policy import CompressionContext


def score_rows(ctx: CompressionContext, fn: Callable[[int, int, Tensor], Tensor]) -> Tensor:
    """Scores ``[B, Hkv, S]`` fp32 from ``fn(row, kv_head, idx) -> [n]``, called once per (row, KV head).

    ``idx [n]`` (long, ascending) are the slots of that head's valid entries; ``fn`` scores those entries in
    that order. Invalid slots score ``-inf`` (never kept; the pipeline ignores scores on them). Scores are
    statistics, never differentiated: computed without autograd even when the model's forward records it.
    """
    b, h, s = ctx.shape
    out = torch.full((b, h, s), float("-inf"), dtype=torch.float32, device=ctx.keys.device)
    with torch.no_grad():
        for r in range(b):
            for j in range(h):
                idx = torch.nonzero(ctx.valid[r, j]).flatten()
                if idx.numel():
                    out[r, j, idx] = fn(r, j, idx).float()
    return out


def inv_freq(head_dim: int, theta: float, device: torch.device | str = "cpu") -> Tensor | None:
    """``[D/2]`` fp64 angular frequencies of RoPE with base ``theta`` (transformers' default rope type), or
    None for an odd head dimension (no ``rotate_half`` layout exists: the vectors are used as they are)."""
    if head_dim % 2:
        return None
    return theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)


def rotate_half(x: Tensor) -> Tensor:
    """``(x1, x2) -> (-x2, x1)`` on the last axis (transformers' convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate(x: Tensor, offsets: Tensor, freq: Tensor | None) -> Tensor:
    """RoPE rotation of ``x [..., n, D]`` by ``offsets [n]`` positions (may be negative); ``x`` itself when
    ``freq`` is None.

    Angles are computed in fp64 from integer offsets, then applied in ``x``'s dtype:
    ``x cos + rotate_half(x) sin`` with each pair's angle ``offset * freq[k]`` used for both of its coordinates.
    """
    if freq is None:
        return x
    ang = offsets.to(torch.float64)[:, None] * freq[None, :]  # [n, D/2]
    ang = torch.cat((ang, ang), dim=-1)
    return x * ang.cos().to(x.dtype) + rotate_half(x) * ang.sin().to(x.dtype)


def mean_rotation(n_future: int, freq: Tensor | None, head_dim: int) -> Tensor:
    """``[D, D]`` fp64: the rotation averaged over offsets ``0 .. n_future - 1``, ``mean_d R(d)`` (the
    identity when ``freq`` is None).

    ``R(d) x = x cos(d f) + rotate_half(x) sin(d f)``, so the mean is ``diag(c) + diag(s) P`` with ``c``, ``s``
    the mean cosines and sines of each pair and ``P`` the matrix of ``rotate_half``.
    """
    if freq is None:
        return torch.eye(head_dim, dtype=torch.float64)
    d = head_dim
    ang = torch.arange(n_future, dtype=torch.float64, device=freq.device)[:, None] * freq[None, :]
    c, s = ang.cos().mean(0), ang.sin().mean(0)
    c, s = torch.cat((c, c)), torch.cat((s, s))
    p = rotate_half(torch.eye(d, dtype=torch.float64, device=freq.device)).T  # P x = rotate_half(x)
    return torch.diag(c) + torch.diag(s) @ p
