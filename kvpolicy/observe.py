"""Attention statistics that scorers ask for, computed in query chunks in fp32.

Nothing here materialises an ``L x L`` matrix for a whole layer: queries are processed in chunks whose
logits fit in :data:`kvpolicy.ops.DEFAULT_CHUNK_BYTES`, and the softmax probabilities are reduced
(summed over the chunk's queries) on the fly. Query heads are reduced to their KV head by the mean
over the group (GQA).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from kvpolicy.ops import DEFAULT_CHUNK_BYTES, chunk_rows


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
    Returns:
        ``[B, Hkv, S]`` fp32: per KV head, the mean over its query heads of the summed attention.
    """
    out = torch.zeros(keys.shape[:3], dtype=torch.float32, device=keys.device)
    for probs in _prob_chunks(queries, keys, scaling, query_pos, key_pos, key_bias, query_valid, max_bytes):
        out[..., : probs.shape[-1]] += probs.sum(dim=3).mean(dim=2)
    return out


def _prob_chunks(queries: Tensor, keys: Tensor, scaling: float, query_pos: Tensor, key_pos: Tensor,
                 key_bias: Tensor | None, query_valid: Tensor | None, max_bytes: int) -> Iterator[Tensor]:
    """Softmax probabilities ``[B, Hkv, group, q_chunk, S']`` fp32, one query chunk at a time (0 where a
    query is invalid or sees nothing).

    Entries are kept in ascending position order, so the keys a chunk can see form a prefix: ``S'`` is
    the length of that prefix (keys after it are invisible to every query of the chunk), which skips
    the upper triangle of a causal prefill (about half the work).
    """
    b, h, q, d = queries.shape
    hkv, s = keys.shape[1], keys.shape[2]
    g = h // hkv
    k32 = keys.float()
    step = chunk_rows(q, b * h * s * 4 * 2, max_bytes)
    for lo in range(0, q, step):
        hi = min(q, lo + step)
        n = int((key_pos <= query_pos[:, lo:hi].max()).sum(-1).max())
        n = max(1, n)
        if not bool((key_pos[..., n:] > query_pos[:, lo:hi].max()).all()):
            n = s  # positions not sorted: no prefix shortcut
        qc = queries[:, :, lo:hi].float().reshape(b, hkv, g * (hi - lo), d)
        logits = (qc @ k32[:, :, :n].transpose(-1, -2)).mul_(scaling).view(b, hkv, g, hi - lo, n)
        visible = key_pos[:, :, None, None, :n] <= query_pos[:, None, None, lo:hi, None]
        if key_bias is not None:
            logits += key_bias[:, :, None, None, :n]
        logits.masked_fill_(~visible, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if query_valid is not None:
            probs = torch.where(query_valid[:, None, None, lo:hi, None], probs, 0.0)
        yield torch.nan_to_num_(probs, nan=0.0)


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
) -> Tensor:
    """Max over queries (and over the query heads of each KV group) of the attention each key receives.

    Same arguments and chunking as :func:`attention_colsum`; KVzip's reconstruction score uses it.
    Returns ``[B, Hkv, S]`` fp32 (0 for keys no valid query sees).
    """
    out = torch.zeros(keys.shape[:3], dtype=torch.float32, device=keys.device)
    for probs in _prob_chunks(queries, keys, scaling, query_pos, key_pos, key_bias, query_valid, max_bytes):
        n = probs.shape[-1]
        out[..., :n] = torch.maximum(out[..., :n], probs.amax(dim=(2, 3)))
    return out


def key_norms(keys: Tensor) -> Tensor:
    """L2 norm of each cached key, ``[B, Hkv, S, D] -> [B, Hkv, S]`` fp32."""
    return keys.float().norm(dim=-1)
