"""D2O (arXiv 2406.13035, Wan et al., ICLR 2025): Dynamic Discriminative Operations.

Two levels, both on top of H2O's eviction (accumulated attention + recent window):

**Layer level: budgets from attention density.** Shallow layers attend densely (many keys matter),
deep layers sparsely; D2O measures each layer's density with the variance of its attention weights and
gives dense layers more cache. Our density of query row ``i`` (``t_i`` visible keys) is

    d_i = 1 / (t_i * sum_j A[i, j]^2) = 1 / (1 + t_i^2 Var_j A[i, j])       in [1 / t_i, 1]

(the inverse participation ratio over ``t_i``: 1 for a uniform row, ``1 / t_i`` for a one-hot row - the
row variance made independent of the row length). A layer's density ``D_l`` is the mean of ``d_i`` over
its query heads and over the **last half** of the prompt's valid queries (the early rows are dense by
construction: ``d_0 = 1``). Layer ``l``'s share of the average budget ``B`` is
``B_l = B * max(D_l / mean(D), min_share)`` renormalised to mean 1 (for budgets so small that a
layer would get less than one entry, the shares are pulled towards uniform until it gets one), rounded by
:func:`kvpolicy.policy.fit_total` so the layers keep exactly ``N * B`` entries.

*Decision: calibration, not the prompt's own attention.* D2O computes the densities from the current
prompt's attention. kvpolicy resolves every layer's budget before layer 0 is compressed
(``KVPolicyCache.begin_forward`` calls ``Policy.layer_budgets``: the budget check must fail before any
layer changes, and a layer is compressed right after its own attention, before the next layer runs),
so the deeper layers' densities are not known when the budgets are fixed. A per-layer running mean
(layer ``l`` compared with layers ``< l``) would make the total depend on the order and break the
exact budget. We therefore measure the densities once per model on a calibration text
(:func:`calibrate_density`, exact, chunked) and the ``d2o-density`` schedule reads the shares
(``shares``: one float per layer; a list of another length is linearly interpolated over depth, so a
profile still applies to a model of another depth; ``None`` = uniform). The ``d2o-smollm2`` preset
carries SmolLM2-135M's profile measured on *Sense & Sensibility* (the benchmarks use *Pride &
Prejudice*); the ``d2o`` preset is uniform (token level only) until calibrated for a model.

**Token level: recall and merge (the compensation mechanism).** Each evicted entry ``e`` finds its most
key-cosine-similar kept entry ``c(e)`` (``sigma_e``; :func:`kvpolicy.ops.cosine_argmax`, chunked, ties to
the lowest slot). It is recalled and merged when ``sigma_e >= tau``; then, for every kept ``c`` with
recalled set ``E_c``, keys and values alike:

    u_c' = (e * u_c + sum_{e in E_c} exp(sigma_e) u_e) / (e + sum_{e in E_c} exp(sigma_e))

(softmax weights over ``{c} + E_c`` with the kept entry's self-similarity 1: ``exp(1) = e``; convex).
Entries below the threshold are dropped.

*Decision: the EMA threshold.* D2O keeps ``tau`` as an exponential moving average of the similarities
seen at successive eviction steps. One-shot prefill compression has a single step: ``tau`` is the
mean, per KV head and row, of the evicted entries' ``sigma_e`` (``tau_0``); at later compactions of the
same layer (decode rule ``rolling``) ``tau <- beta * tau + (1 - beta) * mean(sigma)`` (``beta = 0.9``),
carried in the layer's state. Padding and fillers are never sources or targets.

Shapes: keys/values ``[B, Hkv, S, D]``; densities are computed by query chunks (``chunk x S``), never a
whole ``S x S`` matrix.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from pydantic import Field
from torch import Tensor

from kvpolicy import observe, ops
from kvpolicy.policy import (Budget, CompressionContext, LayerSchedule, Merged, Merger, Policy, Scorer, Selection,
                             evicted_indices, gather_kept)

#: SmolLM2-135M-Instruct layer densities D_l (30 layers), from calibrate_density on Sense & Sensibility,
#: 2000 tokens (see docs/methods/related.md for the command)
SMOLLM2_DENSITY: list[float] = [0.300183, 0.030994, 0.040354, 0.023278, 0.019008, 0.020734, 0.021295, 0.039549, 0.022236, 0.014169,
                                 0.009059, 0.010783, 0.005396, 0.003662, 0.006479, 0.007115, 0.005661, 0.004495, 0.002907, 0.010606,
                                 0.010689, 0.008155, 0.003934, 0.003062, 0.005649, 0.002595, 0.003269, 0.004482, 0.006739, 0.0075]


# --------------------------------------------------------------------------------------------- density
def row_density_sum(queries: Tensor, keys: Tensor, *, scaling: float, query_pos: Tensor, key_pos: Tensor,
                    valid: Tensor, key_bias: Tensor | None = None, query_valid: Tensor | None = None,
                    form: observe.AttentionForm = observe.PLAIN) -> tuple[Tensor, Tensor]:
    """Sum over query heads and the given queries of ``d_i = 1 / (t_i sum_j A_ij^2)``, and the count.

    Args:
        queries ``[B, H, Q, D]`` post-RoPE; keys ``[B, Hkv, S, D]``; query_pos ``[B, Q]``; key_pos, valid
        ``[B, Hkv, S]``; key_bias ``[B, Hkv, S]`` (-inf for invalid entries) or None.
    Returns:
        ``(sum [B], count [B])`` fp32: ``sum / count`` is the layer's density for each row.
    """
    b, h, q, _ = queries.shape
    bias = key_bias if key_bias is not None else torch.zeros(valid.shape, device=keys.device).masked_fill(
        ~valid, float("-inf"))
    seen = (valid[:, :1].unsqueeze(2) & (key_pos[:, :1, None, :] <= query_pos[:, None, :, None])).sum(-1)  # [B,1,Q]
    qv = torch.ones(b, q, dtype=torch.bool, device=keys.device) if query_valid is None else query_valid
    total = torch.zeros(b, dtype=torch.float32, device=keys.device)
    count = torch.zeros(b, dtype=torch.float32, device=keys.device)
    for lo, probs, _ in observe._prob_chunks(queries, keys, scaling, query_pos, key_pos, bias, qv,
                                             ops.DEFAULT_CHUNK_BYTES, form):
        c = probs.shape[3]
        sq = probs.square().sum(-1)  # [B, Hkv, g, c]
        t = seen[:, 0, lo:lo + c].float()  # [B, c]
        ok = qv[:, lo:lo + c] & (t > 0)
        d = 1.0 / (t[:, None, None, :] * sq).clamp_min(1e-30)
        total += torch.where(ok[:, None, None, :], d, 0.0).sum((1, 2, 3))
        count += ok.float().sum(-1) * h
    return total, count


def layer_density(ctx: CompressionContext) -> Tensor:
    """``[B]`` density ``D_l`` of the layer in ``ctx``: mean ``d_i`` over query heads and the last half of
    each row's valid queries."""
    q = ctx._need_queries("D2O's attention density")
    qvalid = ctx.query_valid if ctx.query_valid is not None else torch.ones(q.shape[0], q.shape[2], dtype=torch.bool,
                                                                            device=q.device)
    rank, count = ops.valid_rank(qvalid.unsqueeze(1))
    late = qvalid & (rank[:, 0] >= count // 2)  # [B, Q]: the last half of each row's valid queries
    s, n = row_density_sum(q, ctx.keys, scaling=ctx.scaling, query_pos=ctx.query_pos, key_pos=ctx.positions,
                           valid=ctx.valid, key_bias=ctx.key_bias, query_valid=late, form=ctx.form)
    return s / n.clamp_min(1)


class _DensityProbe(Scorer):
    """Calibration only (not registered): records the layer density, scores by recency."""

    name: ClassVar[str] = "d2o-density-probe"
    paper: ClassVar[str] = "D2O, Wan et al., ICLR 2025, arXiv:2406.13035"

    def score(self, ctx: CompressionContext) -> Tensor:
        ctx.figures["density"] = float(layer_density(ctx)[0])
        return ctx.positions[:, :1].float()


def calibrate_density(model: Any, input_ids: Tensor) -> list[float]:
    """Per-layer densities ``D_l`` of ``model`` on one prompt ``input_ids [1, L]`` (exact, chunked).

    Runs one prefill through a kvpolicy cache whose probe scorer measures each layer's density right after
    its attention (the probe's budget keeps ``L - 1`` entries, so every layer is visited). The result is
    what ``d2o-density``'s ``shares`` takes. A sliding-window layer (never compressed) gets 0.
    """
    import kvpolicy
    from kvpolicy.registry import get_registry

    reg = get_registry()
    comp = lambda kind, name: reg.component(kind, name)()  # noqa: E731
    policy = Policy(name="d2o-calibration", budget=Budget(tokens=int(input_ids.shape[1]) - 1, sink=0),
                    scorer=_DensityProbe(), selector=comp("selector", "topk"), merger=comp("merger", "none"),
                    decode=comp("decode", "none"), schedule=comp("schedule", "uniform"))
    with torch.inference_mode(), kvpolicy.compress(model, policy) as cache:
        model(input_ids=input_ids, cache=cache)
    return [0.0 if layer.is_sliding else round(float(layer.events[0].figures["density"]), 6)
            for layer in cache.layers]


def interpolate(values: list[float], n: int) -> list[float]:
    """``values`` resampled linearly over depth to ``n`` layers (unchanged when the lengths match)."""
    m = len(values)
    if m == n:
        return list(values)
    if m == 1 or n == 1:
        return [sum(values) / m] * n
    out = []
    for i in range(n):
        x = i * (m - 1) / (n - 1)
        lo = min(int(math.floor(x)), m - 2)
        f = x - lo
        out.append(values[lo] * (1 - f) + values[lo + 1] * f)
    return out


def density_shares(densities: list[float], n_layers: int, min_share: float) -> list[float]:
    """Layer shares of the average budget (mean 1): ``max(D_l / mean(D), min_share)``, renormalised."""
    d = interpolate(densities, n_layers)
    mean = sum(d) / len(d)
    s = [max(x / mean if mean > 0 else 1.0, min_share) for x in d]
    m = sum(s) / len(s)
    return [x / m for x in s]


class DensitySchedule(LayerSchedule):
    """D2O layer budgets: each layer's share of the average budget follows its attention density."""

    name: ClassVar[str] = "d2o-density"
    paper: ClassVar[str] = "D2O, Wan et al., ICLR 2025, arXiv:2406.13035"
    promises: ClassVar[frozenset[str]] = frozenset({"same_total"})
    shares: list[float] | None = Field(default=None, description="per-layer densities D_l from calibrate_density "
                                                                  "(interpolated over depth; None = uniform)")
    min_share: float = Field(default=0.25, ge=0.0, le=1.0,
                             description="smallest share of the average budget a layer gets")

    def layer_total(self, avg_total: Tensor, recent: Tensor, layer_idx: int, n_layers: int, *,
                    n_valid: Tensor | None = None) -> Tensor:
        if not self.shares:
            return avg_total
        if any(not (x >= 0 and math.isfinite(x)) for x in self.shares):
            raise ValueError(f"d2o-density shares must be finite and >= 0; got {self.shares}")
        shares = density_shares(self.shares, n_layers, self.min_share)
        avg = avg_total.double()
        smin = min(shares)
        # tiny budgets: pull the shares towards uniform just enough that every layer keeps >= 1 entry
        # (the mean stays 1, so the total stays exact)
        lam = torch.where(avg * smin >= 1, 1.0, (avg - 1) / (avg * (1 - smin)).clamp_min(1e-12)).clamp(0.0, 1.0)
        return avg * (1 + lam * (shares[layer_idx] - 1))  # real-valued: the policy caps, redistributes, rounds


# --------------------------------------------------------------------------------------------- merge
def d2o_fold(kept: Tensor, src: Tensor, assign: Tensor, sigma: Tensor, use: Tensor) -> Tensor:
    """``u_c' = (e u_c + sum exp(sigma_e) u_e) / (e + sum exp(sigma_e))`` over the used sources.

    kept ``[B, H, K, D]``, src ``[B, H, E, D]``, assign/sigma/use ``[B, H, E]``.
    """
    w = torch.where(use, sigma.exp(), 0.0)
    norm = torch.full(kept.shape[:3], math.e, dtype=torch.float32, device=kept.device).scatter_add(2, assign, w)
    return ops.scatter_mean(kept, src, assign, src_weight=w, self_weight=math.e, normalize=norm, src_valid=use)


class D2OMerge(Merger):
    """D2O compensation: evicted entries above an EMA cosine threshold merge into their most similar kept one."""

    name: ClassVar[str] = "d2o"
    paper: ClassVar[str] = "D2O, Wan et al., ICLR 2025, arXiv:2406.13035"
    promises: ClassVar[frozenset[str]] = frozenset({"convex", "identity_on_equal"})
    beta: float = Field(default=0.9, ge=0.0, le=1.0, description="EMA weight of the previous threshold")

    def merge(self, ctx: CompressionContext, selection: Selection, scores: Tensor) -> Merged:
        keys, values = gather_kept(ctx, selection)
        ev_idx, ev_valid = evicted_indices(ctx, selection)
        if ev_idx.shape[-1] == 0 or not bool(ev_valid.any()):
            return Merged(keys=keys, values=values)
        b, h, _ = ctx.shape
        dk = keys.shape[-1]
        kept = ops.expand_heads(selection.kept, h)
        ev_k = ops.gather_seq(ctx.keys, ev_idx)
        assign, sigma = ops.cosine_argmax(ev_k, keys, dst_valid=kept)
        assign = assign.clamp(0, keys.shape[2] - 1)
        mean = torch.where(ev_valid, sigma, 0.0).sum(-1) / ev_valid.sum(-1).clamp_min(1)  # [B, Hkv]
        prev = ctx.state.get("d2o_tau")
        tau = mean if prev is None or prev.shape != mean.shape else self.beta * prev + (1 - self.beta) * mean
        ctx.state["d2o_tau"] = tau
        use = ev_valid & (sigma >= tau.unsqueeze(-1)) & kept.any(-1, keepdim=True)
        kv = torch.cat([keys, values], -1)
        src = torch.cat([ev_k, ops.gather_seq(ctx.values, ev_idx)], -1)
        out = d2o_fold(kv, src, assign, sigma, use)
        n_used = int(use.sum())
        ctx.figures["d2o_tau_mean"] = float(tau.mean())
        return Merged(keys=out[..., :dk], values=out[..., dk:], merged=round(n_used / h))
