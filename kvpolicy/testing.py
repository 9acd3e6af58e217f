"""The invariant kit: hypothesis property tests for any registered component or preset.

One line in a plugin's own test suite proves that its component keeps kvpolicy's promises::

    from kvpolicy.testing import check_component, check_preset

    def test_my_scorer():
        check_component("scorer", "my-scorer")     # composed with defaults for the other steps

    def test_my_preset():
        check_preset("my-preset")

The module is also a pytest plugin (``pytest11`` entry point ``kvpolicy``): the fixture
``kvpolicy_invariants`` returns this module.

What is checked, on random ``CompressionContext`` s built directly (random keys / values / queries,
batch with left padding, GQA, fp32 / fp16 / bf16, degenerate inputs: zero-norm keys, duplicate keys,
all-equal scores, large norms, lengths 1 and budget + 1) and through a tiny random Llama's cache:

Universal (every policy): each step's output passes the pipeline's contract (:mod:`kvpolicy.contract`:
shapes, dtypes and devices, no NaN score, finite kept entries); kept entries valid (pads never kept) and
in ascending original order; pads never merged into a kept entry; inputs not mutated; deterministic; GQA
with identical query heads in a group equals MHA; batch independence (a row left-padded in a batch keeps
the entries, shifted by its padding, that the same row keeps alone without padding); a budget >= the
length reproduces the uncompressed logits at every decoding step; a compressed ``generate()`` runs with
finite logits and no pad entry kept.

Declared (``Component.promises``): selectors ``"exact_size"`` (keeps ``min(budget, valid)`` entries per
row and head), ``"protected"`` (sinks and recent window kept), ``"nested"`` (a larger budget keeps a
superset), ``"layer_total"`` (the heads of a row keep ``heads x budget`` entries together, however an
adaptive allocation splits them), ``"floor"`` (every head keeps at least ``selector.floor x budget``); a
selector that pools layers (``spans_layers()``) also keeps, on the tiny model, exactly the sum of the
layers' budgets per row after the prefill; mergers ``"gather"`` (kept entries bit-identical: pure eviction), ``"identity_on_equal"``
(merging identical vectors returns them; with ``"convex"`` this means non-negative weights summing to
one), ``"convex"`` (each merged coordinate lies between the min and max of the entries merged into it),
``"assign_once"`` (every evicted valid entry is merged into exactly one kept entry); schedules
``"same_total"`` (layer budgets add up to exactly the uniform total, at the policy's ratio and at 0.8).

What the merge promises assume: contributions are read from a run with unit-vector values (value ``j``
= ``e_j``), so ``assign_once`` and ``convex`` hold for mergers whose weights are non-negative;
``convex`` then reruns the merger alone, with the same selection and scores, on random values, so it
assumes the merger's assignment does not depend on the values (the scorer and selector may read them).

Profiles: ``KVPOLICY_HYPOTHESIS_PROFILE=ci`` (default: 20 examples, derandomized) or ``thorough``
(300 examples, random). The kit applies its profile to its own checks only.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass
from typing import Any

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor

from kvpolicy import ops
from kvpolicy.errors import BudgetError, ConfigError, StepOutputError
from kvpolicy.policy import Budget, CompressionContext, LayerBudget, Merged, Policy, Selection

PROFILE_ENV = "KVPOLICY_HYPOTHESIS_PROFILE"
_SUPPRESS = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture,
             HealthCheck.filter_too_much]
settings.register_profile("kvpolicy-ci", max_examples=20, derandomize=True, deadline=None,
                          suppress_health_check=_SUPPRESS, print_blob=True, database=None)
# Every field is explicit: hypothesis loads its own derandomized "ci" profile as the default when $CI is set,
# and a registered profile inherits unset fields from that default.
settings.register_profile("kvpolicy-thorough", max_examples=300, derandomize=False, deadline=None,
                          suppress_health_check=_SUPPRESS, print_blob=True)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
PATTERNS = ("random", "zero_keys", "duplicate", "equal", "large")
BASE_CONFIG: dict[str, Any] = {
    "budget": {"ratio": 0.5, "sink": 1, "recent": 0.25},
    "scorer": {"name": "accumulated-attention"},
    "selector": {"name": "topk"},
    "merger": {"name": "none"},
    "decode": {"name": "none"},
    "layers": {"name": "uniform"},
}
_FIELD_OF_KIND = {"scorer": "scorer", "prior": "prior", "selector": "selector", "merger": "merger",
                  "decode": "decode", "schedule": "layers"}


def profile(name: str | None = None) -> settings:
    """The kit's hypothesis settings: ``name`` or ``$KVPOLICY_HYPOTHESIS_PROFILE`` (``ci`` / ``thorough``)."""
    name = name or os.environ.get(PROFILE_ENV, "ci")
    if name not in ("ci", "thorough"):
        raise ConfigError(f"{PROFILE_ENV}={name!r}: allowed: ci, thorough")
    return settings.get_profile(f"kvpolicy-{name}")


# --------------------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class Case:
    """One random compression input (tensors are generated from ``seed``)."""

    batch: int
    kv_heads: int
    group: int  # query heads per KV head
    seq: int
    head_dim: int
    dtype: torch.dtype
    pads: tuple[int, ...]  # left padding per row
    pattern: str  # one of PATTERNS
    image_share: float
    budget: dict[str, Any]  # {"tokens": t} or {"ratio": r}
    layer_idx: int
    n_layers: int
    seed: int


@st.composite
def cases(draw: Any, max_seq: int = 24, dtypes: tuple[torch.dtype, ...] = DTYPES) -> Case:
    """Hypothesis strategy of :class:`Case` s (lengths 1 .. ``max_seq``, batch 1-2, GQA groups 1-3)."""
    seq = draw(st.integers(1, max_seq))
    batch = draw(st.integers(1, 2))
    pads = tuple(draw(st.integers(0, seq - 1)) if b else 0 for b in range(batch))
    if draw(st.booleans()):
        budget: dict[str, Any] = {"tokens": draw(st.integers(1, seq + 1))}
    else:
        budget = {"ratio": draw(st.sampled_from([0.1, 0.25, 0.5, 0.75, 0.9]))}
    n_layers = draw(st.integers(1, 4))
    return Case(batch=batch, kv_heads=draw(st.integers(1, 2)), group=draw(st.integers(1, 3)), seq=seq,
                head_dim=draw(st.sampled_from([4, 8])), dtype=draw(st.sampled_from(dtypes)), pads=pads,
                pattern=draw(st.sampled_from(PATTERNS)), image_share=draw(st.sampled_from([0.0, 0.5])),
                budget=budget, layer_idx=draw(st.integers(0, n_layers - 1)), n_layers=n_layers,
                seed=draw(st.integers(0, 2**31 - 1)))


@dataclass
class Inputs:
    """The tensors of a case (``[B, Hkv, S, D]`` keys/values, ``[B, H, S, D]`` queries, ``[B, Hkv, S]`` masks)."""

    keys: Tensor
    values: Tensor
    queries: Tensor
    valid: Tensor
    is_image: Tensor
    reconstruction: Tensor  # [B, Hkv, S] fp32 in [0, 1]: a stand-in for a context-reconstruction observation

    def clone(self) -> Inputs:
        return Inputs(*(t.clone() for t in dataclasses.astuple(self)))

    def row(self, b: int) -> Inputs:
        return Inputs(*(t[b:b + 1].clone() for t in dataclasses.astuple(self)))


def make_inputs(case: Case, values: str = "random") -> Inputs:
    """Tensors for ``case``; ``values="basis"`` makes value ``j`` the ``j``-th unit vector (needs D >= S)."""
    g = torch.Generator().manual_seed(case.seed)
    b, h, s, d = case.batch, case.kv_heads, case.seq, case.head_dim
    if values == "basis":
        d = max(d, s)
    keys = torch.randn(b, h, s, d, generator=g)
    vals = torch.randn(b, h, s, d, generator=g)
    queries = torch.randn(b, h * case.group, s, d, generator=g)
    if case.pattern == "zero_keys":
        keys[:, :, torch.rand(s, generator=g) < 0.5] = 0.0
    elif case.pattern == "duplicate":
        src = torch.randint(0, s, (s,), generator=g)
        keys, vals = keys[:, :, src].clone(), vals[:, :, src].clone()
    elif case.pattern == "equal":
        keys[:] = keys[:, :, :1].clone()
        vals[:] = vals[:, :, :1].clone()
        queries[:] = queries[:, :, :1].clone()
    elif case.pattern == "large":
        scale = 300.0
        keys, vals, queries = keys * scale, vals * scale, queries * scale
    if values == "basis":
        vals = torch.eye(d)[:s].expand(b, h, s, d).clone()
    valid = torch.ones(b, h, s, dtype=torch.bool)
    for row, p in enumerate(case.pads):
        valid[row, :, :p] = False
        keys[row, :, :p] = 7.0  # recognisable garbage in pad slots
        if values != "basis":
            vals[row, :, :p] = -7.0
    is_image = (torch.rand(b, 1, s, generator=g) < case.image_share).expand(b, h, s) & valid
    recon = torch.rand(b, h, s, generator=g).masked_fill(~valid, 0.0)
    dt = case.dtype if values != "basis" else torch.float32
    return Inputs(keys.to(dt), vals.to(dt), queries.to(dt), valid, is_image.contiguous(), recon)


def with_budget(policy: Policy, budget: dict[str, Any]) -> Policy:
    """``policy`` with its budget size replaced by ``budget`` (sink and recent window kept)."""
    cfg = policy.budget.model_dump(exclude_none=True)
    cfg.pop("ratio", None)
    cfg.pop("tokens", None)
    cfg.update(budget)
    if isinstance(cfg.get("recent"), int) and "tokens" in cfg and cfg["recent"] > cfg["tokens"]:
        cfg["recent"] = cfg["tokens"]
    if "tokens" in cfg and cfg.get("sink", 0) > cfg["tokens"]:
        cfg["sink"] = cfg["tokens"]  # sinks are part of the budget
    return dataclasses.replace(policy, budget=Budget.model_validate(cfg))


def make_context(policy: Policy, case: Case, inputs: Inputs, budget: LayerBudget | None = None
                 ) -> CompressionContext | None:
    """A prefill :class:`CompressionContext` for ``inputs``, as the cache builds it; None when the budget
    is out of range for this input (the cache would raise :class:`BudgetError` before compressing)."""
    b, h, s, _ = inputs.keys.shape
    valid = inputs.valid
    if budget is None:
        try:
            budget = policy.layer_budget(case.layer_idx, case.n_layers, valid[:, 0].sum(-1))
        except BudgetError:
            return None
    positions = torch.arange(s).expand(b, h, s)
    bias = None
    if not bool(valid.all()):
        bias = torch.zeros(b, h, s).masked_fill(~valid, float("-inf"))
    extra: dict[str, Any] = {}
    plan = getattr(policy, "reconstruction", None)
    if callable(plan) and plan() is not None:  # deferred-prefill scorers: a random reconstruction observation
        extra["reconstruction"] = inputs.reconstruction
    return CompressionContext(
        layer_idx=case.layer_idx, n_layers=case.n_layers, phase="prefill", keys=inputs.keys, values=inputs.values,
        positions=positions, valid=valid, is_image=inputs.is_image, budget=budget,
        scaling=inputs.keys.shape[-1] ** -0.5, queries=inputs.queries, query_pos=torch.arange(s).expand(b, s),
        query_valid=valid[:, 0], key_bias=bias, state={}, **extra)


def compresses(ctx: CompressionContext) -> bool:
    """Whether the cache would run the policy (some row holds more valid entries than its budget)."""
    return bool((ctx.budget.total < ctx.valid[:, 0].sum(-1)).any())


def run(policy: Policy, ctx: CompressionContext, case: Case | None = None) -> tuple[Selection, Merged]:
    """``policy.compress(ctx)``; a step output the pipeline refuses (:mod:`kvpolicy.contract`) fails the
    property it breaks."""
    try:
        return policy.compress(ctx)
    except StepOutputError as err:
        _fail(err.prop, case, str(err))
        raise  # unreachable: _fail raises


# --------------------------------------------------------------------------------------------- checks
class InvariantError(AssertionError):
    """A property of the kit does not hold; the message names the property and the case."""


def _fail(prop: str, case: Case | None, detail: str) -> None:
    raise InvariantError(f"[{prop}] {detail}" + (f"\n  case: {case}" if case is not None else ""))


def _kept_sets(ctx: CompressionContext, sel: Selection) -> list[list[set[int]]]:
    """Kept physical indices per (row, KV head)."""
    b, h, _ = ctx.shape
    idx = ops.expand_heads(sel.indices, h)
    kept = ops.expand_heads(sel.kept, h)
    return [[set(idx[r, j][kept[r, j]].tolist()) for j in range(h)] for r in range(b)]


def check_output(policy: Policy, ctx: CompressionContext, sel: Selection, merged: Merged, case: Case | None
                 ) -> None:
    """Universal properties of one compression result (shapes, order, validity, finiteness)."""
    b, h, s = ctx.shape
    d = ctx.keys.shape[-1]
    idx, kept = sel.indices, sel.kept
    if idx.dim() != 3 or idx.shape[0] != b or idx.shape[1] not in (1, h) or kept.shape != idx.shape:
        _fail("shape", case, f"selection indices {tuple(idx.shape)} / kept {tuple(kept.shape)}; expected "
                             f"[B={b}, 1 or Hkv={h}, K] for both")
    if idx.dtype != torch.long or kept.dtype != torch.bool:
        _fail("dtype", case, f"selection dtypes {idx.dtype} / {kept.dtype}; expected torch.long / torch.bool")
    k = idx.shape[2]
    if not 0 < k <= s or bool((idx < 0).any()) or bool((idx >= s).any()):
        _fail("shape", case, f"K={k} slots with indices in [{int(idx.min())}, {int(idx.max())}] for S={s}")
    for name, t in (("keys", merged.keys), ("values", merged.values)):
        if tuple(t.shape) != (b, h, k, d):
            _fail("shape", case, f"merged {name} {tuple(t.shape)}; expected {(b, h, k, d)}")
        if t.dtype != ctx.keys.dtype or t.device != ctx.keys.device:
            _fail("dtype/device", case, f"merged {name} is {t.dtype} on {t.device}; input is {ctx.keys.dtype} "
                                        f"on {ctx.keys.device}")
    for name, t in (("multiplicity", merged.multiplicity), ("bias", merged.bias)):
        if t is not None and tuple(t.shape) != (b, h, k):
            _fail("shape", case, f"merged {name} {tuple(t.shape)}; expected {(b, h, k)}")
    full_idx, full_kept = ops.expand_heads(idx, h), ops.expand_heads(kept, h)
    if bool((full_kept & ~ctx.valid.gather(2, full_idx)).any()):
        _fail("pads never kept", case, "a slot marked kept points to a padding/invalid entry")
    pos = full_idx.masked_fill(~full_kept, -1)
    for r in range(b):
        for j in range(h):
            p = pos[r, j][full_kept[r, j]]
            if p.numel() > 1 and not bool((p[1:] > p[:-1]).all()):
                _fail("order", case, f"row {r} head {j}: kept indices {p.tolist()} are not strictly ascending")
    if not bool(full_kept.any(-1).all()) and bool((ctx.valid.sum(-1) > 0).all()):
        _fail("non-empty", case, "a row/head with valid entries keeps nothing")
    m = full_kept.unsqueeze(-1)
    for name, t in (("keys", merged.keys), ("values", merged.values)):
        if not bool(torch.isfinite(t.float()).masked_fill(~m, True).all()):
            _fail("finite", case, f"merged {name} hold NaN/Inf in kept slots (pattern {case and case.pattern})")
    for name, t in (("multiplicity", merged.multiplicity), ("bias", merged.bias)):
        if t is not None and not bool(torch.isfinite(t.float()).masked_fill(~full_kept, True).all()):
            _fail("finite", case, f"merged {name} is not finite in kept slots")


def check_promises(policy: Policy, ctx: CompressionContext, sel: Selection, merged: Merged, case: Case | None
                   ) -> None:
    """The properties the policy's selector and merger declare in ``promises``."""
    b, h, s = ctx.shape
    sets = _kept_sets(ctx, sel)
    n_valid = ctx.valid[:, 0].sum(-1)
    sp, mp = policy.selector.promises, policy.merger.promises
    first_stage = policy.selector.spans_layers() and ctx.phase == "prefill"  # a superset; pooled later
    if "exact_size" in sp:
        for r in range(b):
            want = int(min(int(ctx.budget.total[r]), int(n_valid[r])))
            got = [len(x) for x in sets[r]]
            if any(n != want for n in got):
                _fail("exact_size", case, f"row {r} keeps {got} entries per head; budget {want}")
    if "protected" in sp:
        prot = ops.protected_mask(ctx.valid, ctx.budget.sink, ctx.budget.recent)
        for r in range(b):
            for j in range(h):
                need = set(torch.nonzero(prot[r, j]).flatten().tolist())
                fits = len(need) <= int(ctx.budget.total[r])
                if fits and not need <= sets[r][j]:
                    _fail("protected", case, f"row {r} head {j}: sinks/recent {sorted(need - sets[r][j])} evicted")
                if not fits and not first_stage and not sets[r][j] <= need:  # more protected entries than budget: keep only those
                    _fail("protected", case, f"row {r} head {j}: keeps unprotected {sorted(sets[r][j] - need)} while "
                                             f"protected entries exceed the budget")
    if "layer_total" in sp and not first_stage:
        for r in range(b):
            want = min(h * int(ctx.budget.total[r]), h * int(n_valid[r]))
            got = sum(len(x) for x in sets[r])
            if got != want:
                _fail("layer_total", case, f"row {r} keeps {got} entries over its {h} heads; budget {want}")
    if "floor" in sp:
        for r in range(b):
            least = min(int(n_valid[r]), int(int(ctx.budget.total[r]) * policy.selector.floor))
            got = [len(x) for x in sets[r]]
            if min(got) < least:
                _fail("floor", case, f"row {r} keeps {got} entries per head; each head keeps at least {least}")
    if "gather" in mp:
        idx = ops.expand_heads(sel.indices, h)
        kept = ops.expand_heads(sel.kept, h).unsqueeze(-1)
        for name, src, out in (("keys", ctx.keys, merged.keys), ("values", ctx.values, merged.values)):
            ref = ops.gather_seq(src, idx)
            if not bool(((ref == out) | ~kept).all()):
                _fail("gather", case, f"merged {name} differ from the kept input entries (merger promises gather)")


def _merge_basis_checks(policy: Policy, case: Case) -> None:
    """``assign_once``, ``convex`` and pads-never-merged-into, with unit-vector values."""
    basis = make_inputs(case, values="basis")
    ctx = make_context(policy, case, basis)
    if ctx is None or not compresses(ctx):
        return
    sel, merged = run(policy, ctx, case)
    b, h, s = ctx.shape
    idx = ops.expand_heads(sel.indices, h)
    kept = ops.expand_heads(sel.kept, h)
    contrib = merged.values.float()[..., :s] != 0  # [B, H, K, S]: entry j reached kept slot k
    contrib &= kept.unsqueeze(-1)
    pads = ~ctx.valid
    if bool((contrib & pads.unsqueeze(2)).any()):
        _fail("pads never merged", case, "a padding entry's value reached a kept entry")
    mp = policy.merger.promises
    if "assign_once" in mp:
        kept_pos = torch.zeros(b, h, s, dtype=torch.bool).scatter(2, idx, kept)
        evicted = ctx.valid & ~kept_pos
        count = contrib.sum(2)  # [B, H, S]
        bad = evicted & (count != 1)
        if bool(bad.any()):
            r, j, e = (int(x) for x in torch.nonzero(bad)[0])
            _fail("assign_once", case, f"evicted entry {e} (row {r}, head {j}) was merged into "
                                       f"{int(count[r, j, e])} kept entries; expected exactly 1")
    if "convex" in mp:
        # The same selection and scores, other values: the merger alone runs again, so a scorer or selector
        # that reads the values cannot change which entries meet (it did, through filler slots, before).
        # Assumes the merger's assignment (which evicted entry folds into which kept slot) does not depend
        # on the values; a merger whose assignment reads them cannot promise "convex" this way.
        rnd = Inputs(basis.keys, torch.randn(basis.values.shape, generator=torch.Generator().manual_seed(case.seed)),
                     basis.queries, basis.valid, basis.is_image, basis.reconstruction)
        ctx2 = make_context(policy, case, rnd)
        if ctx2 is None:
            return
        scores = policy.scorer.score(make_context(policy, case, basis.clone())).float()
        merged2 = policy.merger.merge(ctx2, sel, scores)
        v = rnd.values.float()  # [B, H, S, D]
        big = torch.finfo(torch.float32).max
        inside = contrib.unsqueeze(-1)  # [B, H, K, S, 1]
        lo = torch.where(inside, v.unsqueeze(2), big).amin(3)
        hi = torch.where(inside, v.unsqueeze(2), -big).amax(3)
        out = merged2.values.float()
        tol = 1e-5 * (1 + v.abs().max())
        ok = ((out >= lo - tol) & (out <= hi + tol)) | ~(kept.unsqueeze(-1) & contrib.any(-1, keepdim=True))
        if not bool(ok.all()):
            _fail("convex", case, "a merged value coordinate lies outside the range of the entries merged into it")


def _identity_on_equal(policy: Policy, case: Case) -> None:
    eq = dataclasses.replace(case, pattern="equal", dtype=torch.float32)
    inputs = make_inputs(eq)
    ctx = make_context(policy, eq, inputs)
    if ctx is None or not compresses(ctx):
        return
    sel, merged = run(policy, ctx, case)
    kept = ops.expand_heads(sel.kept, ctx.shape[1]).unsqueeze(-1)
    for name, src, out in (("keys", inputs.keys, merged.keys), ("values", inputs.values, merged.values)):
        ref = src[:, :, -1:].expand_as(out)  # every valid entry equals the last one
        if not bool((torch.isclose(out.float(), ref.float(), rtol=1e-5, atol=1e-5) | ~kept).all()):
            _fail("identity_on_equal", case, f"merging identical {name} changed them")


def _nested(policy: Policy, case: Case, inputs: Inputs) -> None:
    b = case.batch
    n_valid = inputs.valid[:, 0].sum(-1)
    small = int(n_valid.min())
    if small < 3:
        return
    sink = min(policy.budget.sink, 1)
    recent = torch.ones(b, dtype=torch.long)
    sets = []
    for t in (2, small - 1):
        lb = LayerBudget(total=torch.full((b,), t), sink=sink, recent=recent, ratio=None, seen=n_valid)
        ctx = make_context(policy, case, inputs.clone(), budget=lb)
        sel, _ = run(policy, ctx)
        sets.append(_kept_sets(ctx, sel))
    for r in range(b):
        for j in range(case.kv_heads):
            if not sets[0][r][j] <= sets[1][r][j]:
                _fail("nested", case, f"row {r} head {j}: budget 2 keeps {sorted(sets[0][r][j])}, a larger "
                                      f"budget keeps {sorted(sets[1][r][j])}")


def _same_result(a: tuple[Selection, Merged], b: tuple[Selection, Merged], exact: bool) -> str | None:
    if not (torch.equal(a[0].indices, b[0].indices) and torch.equal(a[0].kept, b[0].kept)):
        return "selections differ"
    kept = ops.expand_heads(a[0].kept, a[1].keys.shape[1]).unsqueeze(-1)
    for name in ("keys", "values"):
        x, y = getattr(a[1], name).float(), getattr(b[1], name).float()
        same = (x == y) if exact else torch.isclose(x, y, rtol=1e-4, atol=1e-4)
        if not bool((same | ~kept).all()):
            return f"merged {name} differ"
    return None


def check_case(policy: Policy, case: Case) -> None:
    """Every context-level property of ``policy`` on one case."""
    policy = with_budget(policy, case.budget)
    inputs = make_inputs(case)
    pristine = inputs.clone()
    ctx = make_context(policy, case, inputs)
    if ctx is None or not compresses(ctx):
        return
    first = run(policy, ctx, case)
    for name, a, b in zip(("keys", "values", "queries", "valid", "is_image", "reconstruction"),
                          dataclasses.astuple(inputs),
                          dataclasses.astuple(pristine)):
        if not torch.equal(a, b):
            _fail("inputs not mutated", case, f"compression modified the input {name}")
    check_output(policy, ctx, *first, case)
    check_promises(policy, ctx, *first, case)
    again = run(policy, make_context(policy, case, pristine.clone()), case)
    diff = _same_result(first, again, exact=True)
    if diff:
        _fail("determinism", case, f"two runs on the same input: {diff}")
    if case.pattern in ("random", "large"):
        if case.batch > 1 or any(case.pads):
            _batch_independent(policy, case, pristine, first)
        if case.group > 1:
            _gqa_equals_mha(policy, case, pristine)
    mp = policy.merger.promises
    if mp & {"assign_once", "convex"} or case.seq <= 24:
        _merge_basis_checks(policy, case)
    if "identity_on_equal" in mp:
        _identity_on_equal(policy, case)
    if "nested" in policy.selector.promises:
        _nested(policy, case, pristine.clone())


def _batch_independent(policy: Policy, case: Case, inputs: Inputs, batched: tuple[Selection, Merged]) -> None:
    """Each row of the left-padded batch keeps the entries (shifted by its padding) that the same row keeps
    alone without any padding."""
    ctx_b = make_context(policy, case, inputs.clone())
    sets_b = _kept_sets(ctx_b, batched[0])
    for r in range(case.batch):
        pad = case.pads[r]
        one = dataclasses.replace(case, batch=1, pads=(0,), seq=case.seq - pad)
        row = inputs.row(r)
        alone_in = Inputs(*(t[:, :, pad:].clone() for t in dataclasses.astuple(row)))
        ctx = make_context(policy, one, alone_in)
        if ctx is None:
            continue
        if not compresses(ctx):
            alone = [set(range(one.seq)) for _ in range(case.kv_heads)]
        else:
            alone = _kept_sets(ctx, run(policy, ctx, case)[0])[0]
        alone = [{i + pad for i in x} for x in alone]
        if alone != sets_b[r]:
            _fail("batch independence", case, f"row {r} (left padding {pad}) keeps "
                                              f"{[sorted(x) for x in sets_b[r]]} in the batch, "
                                              f"{[sorted(x) for x in alone]} alone without padding (shifted)")


def _gqa_equals_mha(policy: Policy, case: Case, inputs: Inputs) -> None:
    """Queries identical within each group must give the MHA result (one query head per KV head)."""
    mha_case = dataclasses.replace(case, group=1)
    mha = inputs.clone()
    mha.queries = inputs.queries[:, ::case.group].clone()
    gqa = mha.clone()
    gqa.queries = mha.queries.repeat_interleave(case.group, dim=1)
    ctx_m = make_context(policy, mha_case, mha)
    ctx_g = make_context(policy, case, gqa)
    if ctx_m is None or ctx_g is None or not compresses(ctx_m):
        return
    diff = _same_result(run(policy, ctx_m), run(policy, ctx_g), exact=False)
    if diff:
        _fail("GQA group 1 equals MHA", case, f"identical query heads in a group vs MHA: {diff}")


# --------------------------------------------------------------------------------------------- model
@functools.lru_cache(maxsize=1)
def tiny_model() -> Any:
    """A 2-layer random Llama (4 query / 2 KV heads, head dim 16), built once."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def _generate(model: Any, ids: Tensor, mask: Tensor, new: int, cache: Any = None) -> Tensor:
    kw = {"cache": cache} if cache is not None else {}
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                         do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0, **kw)
    return torch.stack(out.logits, 1)  # [B, new, V]


def _prompt(seq: int) -> tuple[Tensor, Tensor, int]:
    """Two rows of random token ids ``[2, seq]``, the second left-padded by ``seq // 4``."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 96, (2, seq), generator=g)
    mask = torch.ones(2, seq, dtype=torch.long)
    pad = seq // 4
    ids[1, :pad] = 0
    mask[1, :pad] = 0
    return ids, mask, pad


@functools.lru_cache(maxsize=4)
def _reference_logits(new_tokens: int, seq: int) -> Tensor:
    ids, mask, _ = _prompt(seq)
    with torch.inference_mode():
        return _generate(tiny_model(), ids, mask, new_tokens)


def char_tokenizer(text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
    """A stand-in tokenizer for :func:`tiny_model` (ids 3..95 from characters), for policies that encode a
    prompt (context reconstruction)."""
    return {"input_ids": [3 + ord(c) % 93 for c in text]}


def _compress_kw(policy: Policy) -> dict[str, Any]:
    plan = getattr(policy, "reconstruction", None)
    return {"tokenizer": char_tokenizer} if callable(plan) and plan() is not None else {}


def check_on_model(policy: Policy, *, new_tokens: int = 5, seq: int = 40) -> None:
    """Cache-level properties on a tiny Llama: identity at budget >= length (not for a merger that thins keys,
    which changes every key by design); a batch with left padding
    compresses, decodes with finite logits and never keeps a pad entry; kept positions stay ascending."""
    from kvpolicy.integrate import compress

    model = tiny_model()
    ids, mask, pad = _prompt(seq)
    with torch.inference_mode():
        ref = _reference_logits(new_tokens, seq)
        whole = with_budget(policy, {"tokens": seq + new_tokens + 1})
        with compress(model, whole, **_compress_kw(whole)) as cache:
            same = _generate(model, ids, mask, new_tokens, cache)
        # a merger that thins keys (ThinK) changes them whatever the token budget: no identity to check
        thins = any(getattr(step, "thins_keys", False) for step in policy.steps())
        if not thins and not torch.allclose(ref, same, rtol=1e-4, atol=1e-4):
            _fail("identity at budget >= length", None, f"{policy.name}: logits differ from the uncompressed run "
                                                        f"by {float((ref - same).abs().max()):.3g}")
        with compress(model, with_budget(policy, {"ratio": 0.5}), **_compress_kw(policy)) as cache:
            logits = _generate(model, ids, mask, new_tokens, cache)
    if not bool(torch.isfinite(logits).all()):
        _fail("finite logits", None, f"{policy.name}: a compressed generate() gave NaN/Inf logits")
    seen = seq + new_tokens - 1
    for layer in cache.layers:
        if layer.keys is None:
            continue
        if layer.n_seen != seen:
            _fail("positions", None, f"layer {layer.layer_idx} saw {layer.n_seen} tokens; expected {seen}")
        if bool((layer.valid[1] & (layer.positions[1] < pad)).any()):
            _fail("pads never kept", None, f"{policy.name}: layer {layer.layer_idx} keeps a pad entry")
        p = layer.positions.masked_fill(~layer.valid, -1)
        for r in range(2):
            for j in range(p.shape[1]):
                row = p[r, j][layer.valid[r, j]]
                if row.numel() > 1 and not bool((row[1:] > row[:-1]).all()):
                    _fail("order", None, f"{policy.name}: layer {layer.layer_idx} row {r} head {j} positions "
                                         f"{row.tolist()} not ascending")
        if not bool(torch.isfinite(layer.keys.float()).all() and torch.isfinite(layer.values.float()).all()):
            _fail("finite", None, f"{policy.name}: layer {layer.layer_idx} cache holds NaN/Inf")
    if policy.selector.spans_layers():
        _pooled_total(policy, model, ids, mask)


def _pooled_total(policy: Policy, model: Any, ids: Tensor, mask: Tensor) -> None:
    """A layer-pooling selector keeps, per row, exactly the sum of the layers' budgets after the prefill."""
    from kvpolicy.integrate import compress

    half = with_budget(policy, {"ratio": 0.5})
    with torch.inference_mode(), compress(model, half, **_compress_kw(half)) as cache:
        model(input_ids=ids, attention_mask=mask, cache=cache)
    n_valid = mask.sum(-1)
    budgets = half.layer_budgets(len(cache.layers), n_valid)
    for r in range(ids.shape[0]):
        heads = cache.layers[0].dims()[1]
        want = sum(heads * int(lb.total[r]) for lb in budgets)
        got = sum(int(layer.valid[r].sum()) for layer in cache.layers)
        if got != want:
            _fail("pooled total", None, f"{policy.name}: row {r} keeps {got} entries over all layers and heads; "
                                        f"the layers' budgets add up to {want}")


def check_schedule(policy: Policy, n_layers: int = 6) -> None:
    """Layer budgets are within ``[1, n_valid]``; ``same_total`` schedules add up to exactly the uniform total
    (also at large ratios, where a layer's share can exceed the prompt and must go to the others)."""
    for ratio in (None, 0.8):
        pol = policy if ratio is None else with_budget(policy, {"ratio": ratio})
        for n in (1, 7, 100, 1000, 4000):
            n_valid = torch.tensor([n, max(1, n // 2)])
            avg = pol.budget.total(n_valid)
            try:
                budgets = pol.layer_budgets(n_layers, n_valid)
            except BudgetError:
                continue
            tot = torch.zeros_like(n_valid)
            for i, lb in enumerate(budgets):
                if bool((lb.total < 1).any() or (lb.total > n_valid).any()):
                    _fail("schedule range", None, f"layer {i}: totals {lb.total.tolist()} for {n_valid.tolist()} "
                                                  f"tokens")
                tot += lb.total
            if "same_total" in pol.schedule.promises and not torch.equal(tot, avg * n_layers):
                _fail("same_total", None, f"{pol.budget.describe()}: layer budgets add up to {tot.tolist()} for "
                                          f"{n_valid.tolist()} tokens; uniform gives {(avg * n_layers).tolist()}")


# --------------------------------------------------------------------------------------------- entry points
def check_policy(policy: Policy | Any, *, profile_name: str | None = None, model: bool = True,
                 max_seq: int = 24, hypothesis_settings: settings | None = None) -> None:
    """Run every property on ``policy`` (a Policy or anything :func:`kvpolicy.load_policy` takes).

    ``hypothesis_settings`` replaces the profile (e.g. ``settings(profile(), phases=...)``).
    """
    from kvpolicy.config import load_policy

    if not isinstance(policy, Policy):
        policy = load_policy(policy)

    @(hypothesis_settings or profile(profile_name))
    @given(cases(max_seq=max_seq))
    def prop(case: Case) -> None:
        check_case(policy, case)

    prop()
    check_schedule(policy)
    if model:
        check_on_model(policy)


def _step_name(step: Any) -> Any:
    return step.get("name") if isinstance(step, dict) else step


def companion_preset(kind: str, name: str) -> str | None:
    """The first registered preset (by name) that uses component ``(kind, name)``, if any."""
    from kvpolicy.registry import get_registry

    reg = get_registry()
    for preset in reg.names("preset"):
        if _step_name(reg.preset(preset).config.get(_FIELD_OF_KIND[kind])) == name:
            return preset
    return None


def component_config(kind: str, name: str, params: dict[str, Any] | None = None,
                     base: dict[str, Any] | None = None) -> dict[str, Any]:
    """A policy config that uses component ``(kind, name)``.

    The other steps come from ``base`` if given; else from a preset that uses the component (so a
    merger that needs its own selector gets it), the component keeping that preset's parameters unless
    ``params`` is given; else from :data:`BASE_CONFIG`.
    """
    from kvpolicy.registry import get_registry

    if kind not in _FIELD_OF_KIND:
        raise ConfigError(f"unknown component kind {kind!r}; allowed: {', '.join(_FIELD_OF_KIND)}")
    get_registry().component(kind, name)  # unknown names fail here, with suggestions
    field_name = _FIELD_OF_KIND[kind]
    preset = companion_preset(kind, name) if base is None else None
    if preset is not None:
        cfg = dict(get_registry().preset(preset).config)
        if params is not None:
            cfg[field_name] = {"name": name, **params}
    else:
        cfg = {**BASE_CONFIG, **(base or {})}
        cfg[field_name] = {"name": name, **(params or {})}
    cfg["name"] = f"check-{kind}-{name}"
    cfg.pop("description", None)
    return cfg


def check_component(kind: str, name: str, params: dict[str, Any] | None = None, *,
                    base: dict[str, Any] | None = None, profile_name: str | None = None, model: bool = True,
                    hypothesis_settings: settings | None = None) -> None:
    """Property-test the registered component ``(kind, name)`` composed with default steps.

    Args:
        kind: ``scorer``, ``prior``, ``selector``, ``merger``, ``decode`` or ``schedule``.
        params: the component's parameters (defaults otherwise).
        base: config entries replacing :data:`BASE_CONFIG` ones (e.g. a scorer the component needs).
    """
    from kvpolicy.config import load_policy

    check_policy(load_policy(component_config(kind, name, params, base)), profile_name=profile_name, model=model,
                 hypothesis_settings=hypothesis_settings)


def check_preset(name: str, *, profile_name: str | None = None, model: bool = True, **overrides: Any) -> None:
    """Property-test the registered preset ``name`` (``overrides`` as for :func:`kvpolicy.load_policy`)."""
    from kvpolicy.config import load_policy

    check_policy(load_policy(name, **overrides), profile_name=profile_name, model=model)


# --------------------------------------------------------------------------------------------- config fuzzing
_JUNK = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True), st.text(max_size=6),
                  st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


@st.composite
def valid_configs(draw: Any) -> dict[str, Any]:
    """Policy configs built from registered names with default parameters and in-range budgets."""
    from kvpolicy.registry import get_registry

    reg = get_registry()

    def pick(kind: str) -> dict[str, Any]:
        return {"name": draw(st.sampled_from(reg.names(kind)))}

    if draw(st.booleans()):
        budget: dict[str, Any] = {"ratio": draw(st.floats(0.05, 1.0))}
    else:
        budget = {"tokens": draw(st.integers(1, 48))}
    budget["sink"] = draw(st.integers(0, min(4, budget.get("tokens", 4))))  # sinks are part of the budget
    budget["recent"] = draw(st.sampled_from([0, 0.0, 0.25, 0.5, 1.0]))
    cfg: dict[str, Any] = {"name": "fuzz", "budget": budget, "scorer": pick("scorer"), "selector": pick("selector"),
                           "merger": pick("merger"), "decode": pick("decode"), "layers": pick("schedule")}
    if reg.names("prior") and draw(st.booleans()):
        cfg["prior"] = pick("prior")
    if draw(st.booleans()):
        cfg["layer_overrides"] = {draw(st.sampled_from([0, 1, -1])): {
            draw(st.sampled_from(["scorer", "merger", "selector"])): None, "budget": {"ratio": 0.5}}}
        for ov in cfg["layer_overrides"].values():
            for k in [k for k, v in ov.items() if v is None]:
                ov[k] = pick(k)
    return cfg


@st.composite
def invalid_configs(draw: Any) -> Any:
    """A valid config with one mutation that must make it invalid (or a value that is no mapping)."""
    from kvpolicy.registry import get_registry

    cfg = draw(valid_configs())
    kind = draw(st.sampled_from(["not_mapping", "unknown_name", "extra_top", "extra_budget", "extra_param",
                                 "bad_ratio", "ratio_and_tokens", "bad_tokens", "bad_sink", "recent_over",
                                 "bad_param", "bad_step_type", "missing", "bad_override"]))
    step = draw(st.sampled_from(["scorer", "selector", "merger", "decode", "layers"]))
    if kind == "not_mapping":
        return draw(st.one_of(st.none(), st.integers(), st.text(max_size=5), st.lists(st.integers(), max_size=3)))
    if kind == "unknown_name":
        cfg[step] = {"name": draw(st.text(min_size=1, max_size=8).filter(
            lambda s: s not in get_registry().names(_step_kind(step))))}
    elif kind == "extra_top":
        cfg[draw(st.sampled_from(["budgett", "scorers", "foo"]))] = draw(_JUNK)
    elif kind == "extra_budget":
        cfg["budget"]["ratios"] = draw(_JUNK)
    elif kind == "extra_param":
        cfg[step]["zz_no_such_param"] = draw(_JUNK)
    elif kind == "bad_ratio":
        cfg["budget"] = {"ratio": draw(st.sampled_from([0, -0.1, 1.5, float("nan"), "abc", [0.2]]))}
    elif kind == "ratio_and_tokens":
        cfg["budget"] = {"ratio": 0.2, "tokens": 10}
    elif kind == "bad_tokens":
        cfg["budget"] = {"tokens": draw(st.sampled_from([0, -3, "many", 2.5]))}
    elif kind == "bad_sink":
        cfg["budget"]["sink"] = draw(st.sampled_from([-1, "x", 1.5, None]))
    elif kind == "recent_over":
        cfg["budget"] = {"tokens": 4, "recent": draw(st.integers(5, 100))}
    elif kind == "bad_param":
        name = cfg[step]["name"]
        cls = get_registry().component(_step_kind(step), name)
        fields = [f for f in cls.model_fields if _rejects(cls, f)]
        if not fields:
            cfg[step]["zz_no_such_param"] = 1
        else:
            cfg[step][draw(st.sampled_from(fields))] = {"not": ["a", "scalar"]}
    elif kind == "bad_step_type":
        cfg[step] = draw(st.sampled_from([3, 1.5, ["topk"], True]))
    elif kind == "missing":
        cfg.pop(draw(st.sampled_from(["budget", "scorer"])))
    elif kind == "bad_override":
        cfg["layer_overrides"] = draw(st.sampled_from([{"x": {}}, {0: {"decode": "none"}}, {0: {"budget": 1.5}},
                                                       {0: {"scorer": "no-such-scorer"}}, {0: 3}]))
    return cfg


def _step_kind(step: str) -> str:
    return "schedule" if step == "layers" else step


def _rejects(cls: Any, field_name: str) -> bool:
    from pydantic import ValidationError

    try:
        cls.model_validate({field_name: {"not": ["a", "scalar"]}})
    except ValidationError:
        return True
    return False


def check_configs(*, profile_name: str | None = None, model: bool = True) -> None:
    """Config fuzzing: valid configs build and compress a tiny model's cache; invalid ones raise
    :class:`~kvpolicy.errors.ConfigError` and nothing else."""
    from kvpolicy.config import load_policy
    from kvpolicy.integrate import compress

    ran: list[int] = []

    @profile(profile_name)
    @given(valid_configs())
    def valid(cfg: dict[str, Any]) -> None:
        try:
            policy = load_policy(cfg)
        except ConfigError as err:  # steps that cannot work together, refused when the policy is built
            if "allowed" not in str(err):
                raise
            return
        if not model:
            return
        ids = torch.randint(3, 96, (1, 30), generator=torch.Generator().manual_seed(0))
        try:
            with torch.inference_mode(), compress(tiny_model(), policy, **_compress_kw(policy)) as cache:
                out = tiny_model().generate(input_ids=ids, cache=cache, max_new_tokens=3, do_sample=False,
                                            pad_token_id=0)
        except ConfigError:
            # steps that cannot work together (e.g. a merger that needs its own selector) are reported
            # when the policy first runs, as a ConfigError naming both: acceptable, anything else is not
            return
        assert out.shape == (1, 33), f"generate() returned {tuple(out.shape)}"
        ran.append(1)

    @profile(profile_name)
    @given(invalid_configs())
    def invalid(cfg: Any) -> None:
        try:
            load_policy(cfg)
        except ConfigError:
            return
        raise InvariantError(f"[config fuzzing] invalid config accepted: {cfg!r}")

    valid()
    if model and not ran:
        raise InvariantError("[config fuzzing] no generated valid config compressed a cache: every combination "
                             "was rejected at run time")
    invalid()


# --------------------------------------------------------------------------------------------- pytest plugin
def _pytest_fixture() -> Any:
    import pytest

    @pytest.fixture
    def kvpolicy_invariants() -> Any:
        """The :mod:`kvpolicy.testing` module (``check_component``, ``check_preset``, ``check_policy``...)."""
        import kvpolicy.testing as kit

        return kit

    return kvpolicy_invariants


try:  # only when pytest is installed: the module is also importable without it
    kvpolicy_invariants = _pytest_fixture()
except ImportError:  # pragma: no cover
    pass


__all__ = ["Case", "Inputs", "InvariantError", "cases", "make_inputs", "make_context", "check_case",
           "check_output", "check_promises", "check_on_model", "check_schedule", "check_policy", "check_component",
           "check_preset", "check_configs", "component_config", "valid_configs", "invalid_configs", "profile",
           "tiny_model", "with_budget", "BASE_CONFIG"]
