"""LOOK-M plugin: merge rules (golden and hand-checked examples), text-prior selection, presets."""

from __future__ import annotations

import pytest
import torch

import kvpolicy
from kvpolicy.policy import CompressionContext, LayerBudget, Selection
from kvpolicy_lookm import (Averaged, LookMTopK, Pivotal, TextPrior, Weighted, lookm_budget, lookm_merge,
                            similarity_filter)

from conftest import make_tiny_llama

T = torch.tensor
ATOL = 1e-5


def _ctx(keys, values, *, valid=None, is_image=None, total=(6,), recent=(2,), sink=0) -> CompressionContext:
    b, h, s, _ = keys.shape
    valid = torch.ones(b, h, s, dtype=torch.bool) if valid is None else valid.expand(b, h, s)
    img = torch.zeros(b, h, s, dtype=torch.bool) if is_image is None else is_image.expand(b, h, s)
    return CompressionContext(
        layer_idx=0, n_layers=1, phase="prefill", keys=keys, values=values,
        positions=torch.arange(s).expand(b, h, s), valid=valid, is_image=img,
        budget=LayerBudget(total=T(list(total)), sink=sink, recent=T(list(recent))), scaling=1.0)


# --------------------------------------------------------------------------------------------- merges
def _golden():
    kept = T([[[[1.0, 0.0], [0.0, 1.0]]]])  # c0, c1
    ev = T([[[[2.0, 0.2], [0.1, 3.0], [1.0, 1.0]]]])  # e0, e1, e2
    return kept, ev, torch.ones(1, 1, 2, dtype=torch.bool), torch.ones(1, 1, 3, dtype=torch.bool)


@pytest.mark.parametrize("rule, c0, c1", [
    ("averaged", (1.33333, 0.4), (0.05, 2.0)),
    ("pivotal", (1.16667, 0.2), (0.025, 1.5)),
    ("weighted", (1.23239, 0.30204), (0.04997, 1.99917)),
])
def test_golden_example_of_the_spec(rule, c0, c1):
    """ALGORITHMS.md 6.1: assignment (tie -> first), sigma, and the A/P/W results (values = keys)."""
    kept, ev, kv, evv = _golden()
    res = lookm_merge(kept, kept, ev, ev, kept_valid=kv, ev_valid=evv, rule=rule)
    assert res.assign.tolist() == [[[0, 1, 0]]]
    torch.testing.assert_close(res.sigma, T([[[0.99504, 0.99944, 0.70711]]]), atol=ATOL, rtol=0)
    want = T([[[c0, c1]]])
    torch.testing.assert_close(res.keys, want, atol=ATOL, rtol=0)
    torch.testing.assert_close(res.values, want, atol=ATOL, rtol=0)
    assert res.merged.all()


@pytest.mark.parametrize("rule, h0_k, h0_v, h1_k, h1_v", [
    ("averaged", (0, 0, 1.5), (3, 1), (2, 0.5, 0), (0.5, 3)),
    ("pivotal", (0, 0, 1.25), (2.5, 1.5), (1.5, 0.25, 0), (0.75, 1.5)),
    ("weighted", (0, 0, 1.5), (3, 1), (1.923025, 0.474342, 0), (0.5, 2.846050)),
])
def test_two_kv_heads_share_a_selection_but_assign_per_head(rule, h0_k, h0_v, h1_k, h1_v):
    """Hand-checked: a layer-shared selection ``[B, 1, K]`` over 2 KV heads with 3-D keys, 2-D values.

    Keep entries 0, 1, evict 2. Head 0: k2 = (0,0,2) is parallel to k1 (sigma 1). Head 1: k2 = (3,1,0)
    has cosine 1/sqrt(10) to k0 = (0,1,0) and 3/sqrt(10) to k1 = (1,0,0), so it goes to k1 as well.
    Entry 0 receives nothing and must be bit-identical.
    """
    keys = T([[[[1.0, 0, 0], [0, 0, 1], [0, 0, 2]],
               [[0, 1, 0], [1, 0, 0], [3, 1, 0]]]])
    values = T([[[[1.0, 1], [2, 2], [4, 0]],
                 [[0, 0], [1, 0], [0, 6]]]])
    ctx = _ctx(keys, values, total=(2,), recent=(0,))
    sel = Selection(indices=T([[[0, 1]]]), kept=torch.ones(1, 1, 2, dtype=torch.bool))
    merger = {"averaged": Averaged, "pivotal": Pivotal, "weighted": Weighted}[rule]()
    out = merger.merge(ctx, sel, torch.zeros(1, 2, 3))
    assert out.merged == 1
    assert torch.equal(out.keys[:, :, 0], keys[:, :, 0]) and torch.equal(out.values[:, :, 0], values[:, :, 0])
    torch.testing.assert_close(out.keys[0, :, 1], T([h0_k, h1_k]).float(), atol=ATOL, rtol=0)
    torch.testing.assert_close(out.values[0, :, 1], T([h0_v, h1_v]).float(), atol=ATOL, rtol=0)
    assert ctx.figures["merge_rule"] == rule


@pytest.mark.parametrize("rule, row0, row1", [
    # row0: (key c3, value c3); row1: (key c0, value c0, key c4, value c4)
    ("averaged", ((1.0, 0.5), (2.0, 2.0)), ((0.75, 0.25), (1.0, 0.0), (-1 / 3, 1.0), (7 / 3, 10 / 3))),
    ("weighted", ((0.853553, 0.353553), (1.560660, 1.560660)),
     ((0.676777, 0.176777), (0.707107, 0.0), (0.0, 1.0), (1 / 3, 4 / 3))),
])
def test_batch_of_two_with_left_padding(rule, row0, row1):
    """Hand-checked, batch 2: row 0 has 2 left pads (huge values) that must never be merged from or into.

    Row 0 keeps 3, 4 and evicts 2 (cosine tie between (1,0) and (0,1) -> first kept). Row 1 keeps 0, 4
    and evicts 1 (tie -> c0), 2 (-> c4, sigma 1) and 3 (key (-1,0): cosines -1 and 0 -> c4, sigma 0).
    """
    keys = T([[[[1.0, 0], [1, 0], [1, 1], [1, 0], [0, 1]]],
              [[[1.0, 0], [0.5, 0.5], [0, 2], [-1, 0], [0, 1]]]])
    values = T([[[[100.0, 100], [100, 100], [3, 3], [1, 1], [2, 2]]],
                [[[0.0, 0], [2, 0], [0, 3], [6, 6], [1, 1]]]])
    valid = T([[[False, False, True, True, True]], [[True] * 5]])
    ctx = _ctx(keys, values, valid=valid, total=(2, 2), recent=(0, 0))
    sel = Selection(indices=T([[[3, 4]], [[0, 4]]]), kept=torch.ones(2, 1, 2, dtype=torch.bool))
    out = {"averaged": Averaged, "weighted": Weighted}[rule]().merge(ctx, sel, torch.zeros(2, 1, 5))
    assert out.merged == 4  # 1 + 3 evicted valid entries, no pad
    torch.testing.assert_close(out.keys[0, 0, 0], T(row0[0]), atol=ATOL, rtol=0)
    torch.testing.assert_close(out.values[0, 0, 0], T(row0[1]), atol=ATOL, rtol=0)
    assert torch.equal(out.keys[0, 0, 1], keys[0, 0, 4]) and torch.equal(out.values[0, 0, 1], values[0, 0, 4])
    torch.testing.assert_close(out.keys[1, 0, 0], T(row1[0]), atol=ATOL, rtol=0)
    torch.testing.assert_close(out.values[1, 0, 0], T(row1[1]), atol=ATOL, rtol=0)
    torch.testing.assert_close(out.keys[1, 0, 1], T(row1[2]), atol=ATOL, rtol=0)
    torch.testing.assert_close(out.values[1, 0, 1], T(row1[3]), atol=ATOL, rtol=0)


def test_fillers_are_never_targets():
    """A filler slot (kept=False) holding the best-matching key must not receive anything."""
    kept = T([[[[1.0, 0], [0, 1]]]])
    ev = T([[[[0.0, 5]]]])
    res = lookm_merge(kept, kept, ev, ev, kept_valid=T([[[True, False]]]), ev_valid=T([[[True]]]), rule="averaged")
    assert res.assign.tolist() == [[[0]]]
    torch.testing.assert_close(res.keys, T([[[[0.5, 2.5], [0, 1]]]]))


def test_similarity_filters_by_hand():
    sigma = T([[[0.9, 0.5, 0.1], [0.2, 0.8, 0.8]]])
    valid = torch.ones(1, 2, 3, dtype=torch.bool)
    assert similarity_filter(sigma, valid, "none").all()
    # per head: means 0.5 and 0.6
    assert similarity_filter(sigma, valid, "head").tolist() == [[[True, True, False], [False, True, True]]]
    # code's slot filter: slot means (0.55, 0.65, 0.45) against the global mean 0.55
    assert similarity_filter(sigma, valid, "slot").tolist() == [[[True, True, False], [True, True, False]]]
    # invalid slots take no part in the means and are never selected
    v2 = T([[[True, True, False], [True, True, True]]])
    assert similarity_filter(sigma, v2, "head").tolist() == [[[True, False, False], [False, True, True]]]


def test_filtered_entries_are_dropped_unmerged():
    kept, ev, kv, evv = _golden()
    res = lookm_merge(kept, kept, ev, ev, kept_valid=kv, ev_valid=evv, rule="averaged", filter_mode="head")
    # sigma mean = 0.90053: e2 (0.70711) is filtered out, so c0 only receives e0
    assert res.merged.tolist() == [[[True, True, False]]]
    torch.testing.assert_close(res.keys, T([[[[1.5, 0.1], [0.05, 2.0]]]]), atol=ATOL, rtol=0)


def test_merge_matches_a_naive_loop_on_random_tensors():
    """Cross-check the vectorised merge against a per-head Python loop (GQA-sized: 2 KV heads, batch 2)."""
    g = torch.Generator().manual_seed(0)
    kept_k, kept_v = torch.randn(2, 2, 5, 4, generator=g), torch.randn(2, 2, 5, 4, generator=g)
    ev_k, ev_v = torch.randn(2, 2, 9, 4, generator=g), torch.randn(2, 2, 9, 4, generator=g)
    kv, evv = torch.ones(2, 2, 5, dtype=torch.bool), torch.ones(2, 2, 9, dtype=torch.bool)
    for rule in ("averaged", "pivotal", "weighted"):
        res = lookm_merge(kept_k, kept_v, ev_k, ev_v, kept_valid=kv, ev_valid=evv, rule=rule)
        for b in range(2):
            for h in range(2):
                cos = torch.nn.functional.cosine_similarity(ev_k[b, h, :, None], kept_k[b, h, None], dim=-1)
                sig, a = cos.max(-1)
                for u, got in ((kept_k, res.keys), (kept_v, res.values)):
                    src = ev_k if u is kept_k else ev_v
                    for c in range(5):
                        es = (a == c).nonzero().flatten().tolist()
                        tot = u[b, h, c].clone()
                        for e in es:
                            tot += {"averaged": src[b, h, e], "pivotal": (src[b, h, e] + u[b, h, c]) / 2,
                                    "weighted": sig[e] * src[b, h, e]}[rule]
                        torch.testing.assert_close(got[b, h, c], tot / (1 + len(es)), atol=1e-5, rtol=1e-5)


def test_identical_vectors_and_half_precision_zero_norm():
    x = T([[[[0.3, -1.0], [2.0, 2.0]]]])
    for rule in ("averaged", "pivotal", "weighted"):
        res = lookm_merge(x, x, x[:, :, :1].repeat(1, 1, 3, 1), x[:, :, :1].repeat(1, 1, 3, 1),
                          kept_valid=torch.ones(1, 1, 2, dtype=torch.bool), ev_valid=torch.ones(1, 1, 3, dtype=torch.bool),
                          rule=rule)
        torch.testing.assert_close(res.keys, x, atol=1e-6, rtol=0)
    kh = T([[[[0.0, 0.0], [1000.0, 0.0]]]]).half()
    eh = T([[[[0.0, 0.0], [60000.0, 100.0]]]]).half()
    for rule in ("averaged", "pivotal", "weighted"):
        res = lookm_merge(kh, kh, eh, eh, kept_valid=torch.ones(1, 1, 2, dtype=torch.bool),
                          ev_valid=torch.ones(1, 1, 2, dtype=torch.bool), rule=rule)
        assert res.keys.dtype == torch.float16 and torch.isfinite(res.keys).all()


# --------------------------------------------------------------------------------------------- selection
def _select(is_image, scores, *, total=6, recent=2, sink=0, valid=None, **params):
    b, h, s = scores.shape
    keys = torch.randn(b, h, s, 2)
    ctx = _ctx(keys, keys, valid=valid, is_image=is_image, total=(total,) * b, recent=(recent,) * b, sink=sink)
    prior = TextPrior().priority(ctx)
    sel = LookMTopK(**params).select(ctx, scores, prior)
    return [[sorted(sel.indices[bi, hi][sel.kept[bi, hi]].tolist()) for hi in range(sel.indices.shape[1])]
            for bi in range(b)], ctx


def test_text_prior_keeps_text_then_best_images_per_head():
    """M = 2, N = 4; text of P = {0, 1} takes 2 of N, the 2 best images per head take the rest (ties low)."""
    img = T([[[False, False, True, True, True, True, True, True, False, False]]])
    scores = T([[[0.0, 0.0, 0.1, 0.5, 0.5, 0.2, 0.9, 0.3, 0.0, 0.0],
                 [0.0, 0.0, 0.8, 0.1, 0.1, 0.1, 0.1, 0.7, 0.0, 0.0]]])
    kept, _ = _select(img, scores)
    assert kept == [[[0, 1, 3, 6, 8, 9], [0, 1, 2, 7, 8, 9]]]


def test_text_beyond_budget_is_kept_unless_capped():
    """|T∩P| = 5 > N = 4: all text kept, |C| = M + 5 = 7 > budget; capped -> best 4 text by score."""
    img = T([[[False, False, False, False, False, True, True, True, False, False]]])
    scores = T([[[0.1, 0.5, 0.2, 0.3, 0.4, 9.0, 9.0, 9.0, 0.0, 0.0]]])
    kept, ctx = _select(img, scores)
    assert kept == [[[0, 1, 2, 3, 4, 8, 9]]]
    assert ctx.figures["over_budget"] == 1
    capped, _ = _select(img, scores, cap_priority=True)
    assert capped == [[[1, 2, 3, 4, 8, 9]]]


def test_text_only_rows_are_plain_topk_and_require_images_keeps_them():
    """No visual entry: the prior is a no-op (top-k by score); require_images keeps the row whole."""
    img = torch.zeros(1, 1, 10, dtype=torch.bool)
    scores = T([[[0.1, 0.5, 0.2, 0.3, 0.4, 0.0, 0.6, 0.05, 0.0, 0.0]]])
    kept, _ = _select(img, scores)
    assert kept == [[[1, 3, 4, 6, 8, 9]]]
    whole, _ = _select(img, scores, require_images=True)
    assert whole == [[list(range(10))]]


def test_selection_batch_with_padding():
    """Row 0: 3 left pads (never kept); row 1 full. Budget 4, window 2 for both rows."""
    img = T([[[False, False, False, False, True, True, True, True, False, False]],
             [[False, True, True, True, True, True, True, False, False, False]]])
    valid = T([[[False, False, False] + [True] * 7], [[True] * 10]])
    scores = torch.arange(10, 0, -1).float().expand(2, 1, 10)  # earlier = higher
    kept, _ = _select(img, scores, total=4, recent=2, valid=valid)
    # row 0: text of P = {3} (pads excluded) + best image 4 + window {8, 9}
    # row 1: text of P = {0, 7} fills N = 2 + window {8, 9}
    assert kept == [[[3, 4, 8, 9]], [[0, 7, 8, 9]]]


def test_lookm_budget_mapping():
    assert lookm_budget(0.1, 0.1) == {"ratio": 0.2, "recent": 0.5, "sink": 0}
    with pytest.raises(ValueError, match="a1"):
        lookm_budget(0.8, 0.5)
    policy = kvpolicy.load_policy("lookm-pivot")
    lb = policy.layer_budget(0, 1, T([1500]))
    assert (int(lb.total[0]), int(lb.recent[0])) == (300, 150)  # N + M = 300, M = int(0.1 L) = 150


# --------------------------------------------------------------------------------------------- end to end (tiny)
def _run(model, policy, ids, modality=None, new=3):
    with kvpolicy.compress(model, policy) as cache:
        if modality is not None:
            cache.modality = modality
        model.generate(input_ids=ids, cache=cache, max_new_tokens=new, min_new_tokens=new,
                       do_sample=False)
    return cache


@pytest.mark.parametrize("n_text_p", [7, 31])
def test_exact_size_with_visual_entries_on_a_tiny_model(n_text_p):
    """L = 200, M = N = 20: |C| = M + max(N, |T∩P|); all text kept; pads none; merged = the rest."""
    model = make_tiny_llama(seed=1)
    ids = torch.randint(1, 128, (1, 200), generator=torch.Generator().manual_seed(2))
    modality = torch.ones(1, 200, dtype=torch.bool)
    text_pos = torch.randperm(180, generator=torch.Generator().manual_seed(3))[:n_text_p]
    modality[0, text_pos] = False
    modality[0, 180:] = False  # the recent window is text (a question after the image)
    cache = _run(model, "lookm-pivot", ids, modality)
    want = 20 + max(20, n_text_p)
    for layer, row in zip(cache.layers, cache.report().layers):
        assert row.tokens_kept == want + 2  # + 2 decoded tokens appended after the prefill
        text_kept = layer.positions[0][~layer.is_image[0]].reshape(layer.keys.shape[1], -1)
        assert (text_kept[:, : n_text_p].sort(-1).values == text_pos.sort().values).all()
        assert row.image_tokens_in == 200 - 20 - n_text_p
        assert row.image_tokens_kept == max(0, 20 - n_text_p)
        assert row.tokens_merged == 200 - want


def test_text_only_lookm_equals_h2o_plus_merge(tiny_llama):
    """On text the prior is a no-op: lookm-pivot builds the same cache as the composition without it."""
    ids = torch.randint(1, 128, (1, 120), generator=torch.Generator().manual_seed(4))
    a = _run(tiny_llama, "lookm-pivot", ids)
    cfg = kvpolicy.load_policy("lookm-pivot").to_config()
    cfg.pop("prior")
    cfg["selector"] = {"name": "topk"}
    b = _run(tiny_llama, cfg, ids)
    for la, lb in zip(a.layers, b.layers):
        assert la.physical_length == 24 + 2
        assert torch.equal(la.keys, lb.keys) and torch.equal(la.values, lb.values)
    c = _run(tiny_llama, kvpolicy.load_policy("lookm-pivot", selector={"name": "lookm-topk",
                                                                       "require_images": True}), ids)
    assert all(layer.physical_length == 122 for layer in c.layers)


# --------------------------------------------------------------------------------------------- presets (SmolLM2)
PRESETS = ["lookm-avg", "lookm-pivot", "lookm-weighted", "text-prior-h2o", "lookm-avg-notp", "lookm-pivot-notp",
           "lookm-weighted-notp"]


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_presets_generate_on_smollm2(smollm2, smol_passage, preset):
    """First 500 tokens of the passage at budget 0.2: 100 entries per layer after the prefill (50 recent +
    50 important; text only, so the prior is a no-op), + 31 decoded tokens; the 400 others merged."""
    model, _ = smollm2
    ids = smol_passage[:, :500]
    with kvpolicy.compress(model, preset, budget=0.2) as cache:
        out = model.generate(input_ids=ids, cache=cache, max_new_tokens=32, min_new_tokens=32,
                             do_sample=False)
    assert out.shape == (1, 532)
    report = cache.report()
    assert len(report.layers) == 30
    merges = preset != "text-prior-h2o"
    for layer, row in zip(cache.layers, report.layers, strict=True):
        assert (row.tokens_seen, row.entries, row.tokens_kept) == (531, 131, 131)
        assert row.tokens_merged == (400 if merges else 0)
        assert row.image_tokens_in == row.image_tokens_kept == 0
        pos = layer.positions[0]
        assert bool((pos[:, -81:] == torch.arange(450, 531)).all())  # recent window + decoded tokens
        if preset.endswith("-notp"):
            assert bool((pos[:, :4] == torch.arange(4)).all())  # 4 sinks forced
    assert report.bytes_now < 0.3 * report.bytes_full


# --------------------------------------------------------------------------------------------- invariant kit
@pytest.mark.parametrize("preset, model", [("lookm-pivot", True), ("lookm-weighted", False),
                                           ("lookm-avg-notp", False)])
def test_presets_keep_the_invariants(preset, model):
    """kvpolicy.testing: shapes, pads, order, determinism, batch independence, GQA = MHA, plus the promises
    (protected + nested selection; A/P-Merge convex and assign-once; identity on equal vectors)."""
    from kvpolicy.testing import check_preset

    check_preset(preset, model=model)
