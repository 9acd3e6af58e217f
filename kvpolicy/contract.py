"""What each policy step must return, checked at the pipeline boundary every time a layer is compressed.

A scorer, prior, selector or merger written by anyone runs inside the cache; a wrong shape, a NaN
score or keys of the wrong dtype would otherwise fail far away (inside top-k, inside SDPA at the next
decode step) or silently corrupt the cache. :func:`check_scores`, :func:`check_priority`,
:func:`check_selection` and :func:`check_merged` raise :class:`~kvpolicy.errors.StepOutputError`
naming the component, the plugin and distribution it came from, what it returned and what is allowed.

The checks are O(entries) reductions (shape comparisons, one NaN pass over the scores, one finiteness
pass over the merged entries, an ordering test): 0.19 ms for a 2000-token layer with 3 KV heads, 1.8 %
of SnapKV's compression step, which is itself about 1.5 % of the prefill (``python
benchmarks/bench_contract.py``, one thread). Shapes: per-entry tensors ``[B, Hkv or 1,
S]``, selections ``[B, Hs, K]``, merged keys/values ``[B, Hkv, K, D]``.

Allowed values: scores are real numbers or ``±inf`` (an extreme rank), never NaN, on valid entries
(padding slots are ignored); priorities are finite and integer-valued; selection indices lie in
``[0, S)``, are ascending among kept slots and never mark an invalid entry kept; merged keys and values
have the cache's dtype and device and are finite in kept slots; ``multiplicity`` is finite and positive,
``bias`` finite, in kept slots.
"""

from __future__ import annotations

import numbers
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from kvpolicy.errors import StepOutputError

if TYPE_CHECKING:
    from kvpolicy.policy import CompressionContext, Component, Merged, Selection


def origin(step: Component) -> str:
    """``"scorer 'snapkv' (plugin 'baselines', distribution 'kvpolicy')"``, as far as the registry knows."""
    what = f"{step.kind} {step.name!r}"
    try:
        from kvpolicy.registry import get_registry

        hit = get_registry().components.get((step.kind, step.name))
    except Exception:  # noqa: BLE001 - only decorates an error message
        hit = None
    if hit is not None and hit.obj is type(step):
        return f"{what} (plugin {hit.plugin!r}, distribution {hit.distribution!r})"
    return f"{what} (class {type(step).__module__}.{type(step).__qualname__}, not from the registry)"


def _fail(step: Component, ctx: CompressionContext, returned: str, allowed: str, prop: str = "shape") -> None:
    raise StepOutputError(f"{origin(step)} returned {returned} for layer {ctx.layer_idx} ({ctx.phase}); "
                          f"allowed: {allowed}", prop=prop)


def _per_entry_shape(step: Component, ctx: CompressionContext, t: object, what: str) -> Tensor:
    b, h, s = ctx.shape
    allowed = f"a tensor of shape [B={b}, Hkv={h} or 1, S={s}] on {ctx.keys.device}"
    if not isinstance(t, Tensor):
        _fail(step, ctx, f"{what} of type {type(t).__name__}", allowed)
    if t.dim() != 3 or t.shape[0] != b or t.shape[1] not in (1, h) or t.shape[2] != s:
        _fail(step, ctx, f"{what} of shape {list(t.shape)}", allowed)
    if t.device != ctx.keys.device:
        _fail(step, ctx, f"{what} on {t.device}", allowed, "dtype/device")
    return t


def _valid_for(ctx: CompressionContext, heads: int) -> Tensor:
    return ctx.valid[:, :1] if heads == 1 else ctx.valid


def _finite_rows(t: Tensor) -> Tensor:
    """``[..., K, D] -> [..., K]`` bool: every coordinate finite. ``x * 0`` is 0 for a finite ``x`` and NaN
    for ``±inf`` or NaN, so the row sum is 0 exactly when the row is finite (5-10x cheaper than
    ``isfinite(t).all(-1)`` on CPU, and exact: nothing can overflow)."""
    return (t * 0).sum(-1) == 0


def check_scores(step: Component, ctx: CompressionContext, scores: object) -> Tensor:
    """``scores`` as fp32 ``[B, Hkv or 1, S]``; NaN on a valid entry is refused."""
    t = _per_entry_shape(step, ctx, scores, "scores")
    if t.is_complex():
        _fail(step, ctx, f"scores of dtype {t.dtype}", "a real-valued tensor (fp32 preferred; bool and integer "
                                                       "tensors are taken as 0/1 and counts)", "dtype/device")
    t = t.float()
    nan = t.isnan() & _valid_for(ctx, t.shape[1])
    if bool(nan.any()):
        r, j, e = (int(x) for x in torch.nonzero(nan)[0])
        _fail(step, ctx, f"NaN scores for {int(nan.sum())} valid entries (first: row {r}, head {j}, entry {e})",
              "real scores or +-inf on every valid entry", "finite")
    return t


def check_priority(step: Component, ctx: CompressionContext, priority: object) -> Tensor:
    """``priority`` ``[B, Hkv or 1, S]``, finite and integer-valued on valid entries."""
    t = _per_entry_shape(step, ctx, priority, "priorities")
    if t.dtype == torch.bool:
        return t.long()
    v = t.double()
    bad = (~torch.isfinite(v) | (v != v.round())) & _valid_for(ctx, t.shape[1])
    if bool(bad.any()):
        _fail(step, ctx, f"{int(bad.sum())} non-integer or non-finite priorities", "finite integer values", "finite")
    return t


def check_selection(step: Component, ctx: CompressionContext, selection: object, *, pads_allowed: bool = False
                    ) -> None:
    """Indices ``[B, Hs, K]`` long in ``[0, S)``, ``kept`` bool of the same shape, kept slots valid (unless
    ``pads_allowed``: a decode rule's list of entries to keep may name pads, which stay invalid) and strictly
    ascending."""
    from kvpolicy.policy import Selection

    b, h, s = ctx.shape
    allowed = (f"a Selection with indices (torch.long) and kept (torch.bool), both [B={b}, Hkv={h} or 1, K] "
               f"with 0 < K <= S={s}, indices in [0, {s}), kept slots valid and ascending")
    if not isinstance(selection, Selection):
        _fail(step, ctx, f"a {type(selection).__name__}", allowed)
    idx, kept = selection.indices, selection.kept
    if not (isinstance(idx, Tensor) and isinstance(kept, Tensor)):
        _fail(step, ctx, "indices/kept that are not tensors", allowed)
    if (idx.dim() != 3 or idx.shape[0] != b or idx.shape[1] not in (1, h) or not 0 < idx.shape[2] <= s
            or kept.shape != idx.shape):
        _fail(step, ctx, f"indices {list(idx.shape)} / kept {list(kept.shape)}", allowed)
    if idx.dtype != torch.long or kept.dtype != torch.bool:
        _fail(step, ctx, f"indices {idx.dtype} / kept {kept.dtype}", allowed, "dtype/device")
    if idx.device != ctx.keys.device or kept.device != ctx.keys.device:
        _fail(step, ctx, f"a selection on {idx.device}", allowed, "dtype/device")
    if bool((idx < 0).any() | (idx >= s).any()):
        _fail(step, ctx, f"indices in [{int(idx.min())}, {int(idx.max())}]", allowed)
    if not pads_allowed and bool((kept & ~_valid_for(ctx, idx.shape[1]).gather(2, idx)).any()):
        _fail(step, ctx, "a kept slot pointing to a padding or invalid entry", allowed, "pads never kept")
    before = torch.where(kept, idx, -1).cummax(-1).values  # largest kept index so far (fillers sit anywhere)
    if bool((kept[..., 1:] & (idx[..., 1:] <= before[..., :-1])).any()):
        _fail(step, ctx, "kept indices that are not strictly ascending", allowed, "order")


def check_merged(step: Component, ctx: CompressionContext, selection: Selection, merged: object) -> None:
    """Keys/values ``[B, Hkv, K, D]`` in the cache's dtype and device, finite in kept slots."""
    from kvpolicy.policy import Merged

    b, h, _, d = ctx.keys.shape
    k = selection.indices.shape[2]
    dv = ctx.values.shape[-1]
    allowed = (f"a Merged with keys [B={b}, Hkv={h}, K={k}, D={d}] and values [.., Dv={dv}] in "
               f"{ctx.keys.dtype} on {ctx.keys.device} (the cache's), finite in kept slots")
    if not isinstance(merged, Merged):
        _fail(step, ctx, f"a {type(merged).__name__}", allowed)
    kept = selection.kept.expand(b, h, k)
    for name, t, last in (("keys", merged.keys, d), ("values", merged.values, dv)):
        if not isinstance(t, Tensor) or tuple(t.shape) != (b, h, k, last):
            _fail(step, ctx, f"{name} of shape {list(getattr(t, 'shape', []))}", allowed)
        if t.dtype != ctx.keys.dtype or t.device != ctx.keys.device:
            _fail(step, ctx, f"{name} in {t.dtype} on {t.device}", allowed, "dtype/device")
        if not bool((_finite_rows(t) | ~kept).all()):
            _fail(step, ctx, f"NaN/Inf {name} in kept slots", allowed, "finite")
    for name, t in (("multiplicity", merged.multiplicity), ("bias", merged.bias)):
        if t is None:
            continue
        if not isinstance(t, Tensor) or tuple(t.shape) != (b, h, k) or t.device != ctx.keys.device:
            _fail(step, ctx, f"{name} of shape {list(getattr(t, 'shape', []))}",
                  f"None or a tensor [B={b}, Hkv={h}, K={k}] on {ctx.keys.device}")
        ok = torch.isfinite(t) & (t > 0) if name == "multiplicity" else torch.isfinite(t)
        if not bool((ok | ~kept).all()):
            _fail(step, ctx, f"{name} that is not finite{' and positive' if name == 'multiplicity' else ''} "
                             f"in kept slots", f"finite{' positive' if name == 'multiplicity' else ''} values", "finite")
    ch = merged.key_channels
    if ch is not None:
        ok = (isinstance(ch, Tensor) and ch.dim() == 3 and tuple(ch.shape[:2]) == (b, h) and 0 < ch.shape[2] < d
              and ch.dtype == torch.long and ch.device == ctx.keys.device)
        if ok:
            ok = bool(((ch >= 0) & (ch < d)).all()) and bool((ch[..., 1:] > ch[..., :-1]).all())
        if not ok:
            got = f"{list(ch.shape)} {ch.dtype}" if isinstance(ch, Tensor) else type(ch).__name__
            _fail(step, ctx, f"key_channels {got}",
                  f"None or ascending distinct long channel indices [B={b}, Hkv={h}, D'] with 0 < D' < {d}")
    if isinstance(merged.merged, bool) or not isinstance(merged.merged, numbers.Integral) or merged.merged < 0:
        _fail(step, ctx, f"merged={merged.merged!r}", "a count >= 0 of evicted tokens folded into kept entries")
