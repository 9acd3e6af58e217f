"""Budget allocation by score: how many entries each KV head (or each layer's head) keeps.

The uniform budget gives every KV head of a layer the same count. Adaptive allocation (AdaKV, arXiv
2407.11550; KVzip's global top-k, arXiv 2505.23416) pools the entries of several *groups* (the heads of
one layer, or every head of every layer) and spends the pool's total on the highest scores, after a
per-group floor: a head that attends to a few tokens keeps few, a diffuse head keeps many.

Scores must be comparable across the pooled groups. Attention masses are (each query's attention sums to
one, so a head's window votes, accumulated sums and max attentions live on one scale); key norms or
random scores are not, and :class:`~kvpolicy.policy.Scorer` declares it with ``comparable``.

Shapes: ``[B, G, S]`` for ``G`` groups of up to ``S`` entries; counts ``[B, G]`` long.
"""

from __future__ import annotations

import torch
from torch import Tensor


def allocate(scores: Tensor, valid: Tensor, total: Tensor, floor: Tensor) -> Tensor:
    """Split each row's ``total`` entries over its groups: floors first, then the best remaining scores.

    Args:
        scores: ``[B, G, S]`` fp32, comparable across groups; ``+inf`` marks entries that must be kept.
        valid: ``[B, G, S]`` bool; invalid entries are never counted.
        total: ``[B]`` long, entries the row keeps over all its groups.
        floor: ``[B, G]`` long, the least each group keeps (capped at its valid count); the floors must
            add up to at most ``total``.
    Returns:
        ``counts [B, G]`` long with ``counts.sum(-1) == min(total, valid.sum((1, 2)))`` and
        ``counts >= min(floor, valid count)``. Ties go to the lower group, then the lower rank within a
        group (stable sorts), so a row's counts do not depend on the padding or the other rows of a batch.
    """
    b, g, s = scores.shape
    n_valid = valid.sum(-1)
    floor = torch.minimum(floor.to(n_valid.device), n_valid)
    if bool((floor.sum(-1) > total.to(n_valid.device)).any()):
        raise ValueError(f"allocation floors {floor.sum(-1).tolist()} exceed the row totals {total.tolist()}")
    key = torch.where(valid, scores.float(), torch.full_like(scores, float("-inf"), dtype=torch.float32))
    srt = torch.sort(key, dim=-1, descending=True, stable=True).values  # [B, G, S]
    rank = torch.arange(s, device=scores.device).expand(b, g, s)
    flat = srt.reshape(b, g * s)
    in_floor = ((rank < floor.unsqueeze(-1)) & (srt > float("-inf"))).reshape(b, g * s)
    order = torch.sort(flat, dim=-1, descending=True, stable=True).indices
    # floors rank first (even above forced +inf entries of another group), then by score
    order = order.gather(-1, torch.sort(in_floor.gather(-1, order).to(torch.int8), dim=-1, descending=True,
                                        stable=True).indices)
    limit = torch.minimum(total.to(n_valid.device), n_valid.sum(-1)).unsqueeze(-1)  # [B, 1]
    take = torch.arange(g * s, device=scores.device).expand(b, g * s) < limit
    take &= flat.gather(-1, order) > float("-inf")
    counts = torch.zeros(b, g, dtype=torch.long, device=scores.device)
    counts.scatter_add_(1, order // s, take.long())
    return counts


def head_floor(per_head: Tensor, share: float, heads: int) -> Tensor:
    """Floors ``[B, heads]``: ``share`` of each row's uniform per-head budget ``per_head [B]`` (floored)."""
    return (per_head.double() * share).floor().long().unsqueeze(-1).expand(-1, heads)


__all__ = ["allocate", "head_floor"]
