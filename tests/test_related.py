"""CORM, CaM and D2O (plugins/kvpolicy_related): each against an independent reference on small tensors,
then on SmolLM2 (sizes and a real generate). The invariant kit runs on every registered component and preset
in tests/test_properties.py; here it also runs the mergers under a layer-shared (TOVA) selection.

The references below compute the full attention matrix of a tiny layer with plain loops and never call
the plugin's helpers.
"""

from __future__ import annotations

import math

import pytest
import torch

import kvpolicy
from kvpolicy import testing as kit
from kvpolicy.policy import CompressionContext, run_steps
from kvpolicy_related.d2o import SMOLLM2_DENSITY, calibrate_density, density_shares, layer_density

S, D, HKV, H = 24, 8, 2, 4
G = H // HKV


def _tensors(seed: int = 0, s: int = S):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, H, s, D, generator=g)
    k = torch.randn(1, HKV, s, D, generator=g)
    v = torch.randn(1, HKV, s, D, generator=g)
    return q, k, v


def _ctx(policy, q, k, v, pad: int = 0) -> CompressionContext:
    """A prefill context for one layer; ``pad`` invalid entries on the left."""
    b, _, s, _ = k.shape
    valid = torch.ones(b, HKV, s, dtype=torch.bool)
    valid[:, :, :pad] = False
    pos = (torch.arange(s) - pad).clamp_min(0).expand(b, HKV, s).clone()
    budget = policy.layer_budget(0, 1, valid[:, 0].sum(-1))
    return CompressionContext(layer_idx=0, n_layers=1, phase="prefill", keys=k, values=v, positions=pos,
                              valid=valid, is_image=torch.zeros_like(valid), budget=budget, scaling=D ** -0.5,
                              queries=q, query_pos=pos[:, 0], query_valid=valid[:, 0],
                              key_bias=torch.zeros(valid.shape).masked_fill(~valid, float("-inf")) if pad else None)


def _attention(q, k):
    """Reference causal attention ``[H, S, S]`` in float64 (one row at a time)."""
    s = k.shape[2]
    out = torch.zeros(H, s, s, dtype=torch.float64)
    for h in range(H):
        for i in range(s):
            logits = torch.tensor([float(q[0, h, i] @ k[0, h // G, j]) * D ** -0.5 for j in range(i + 1)],
                                  dtype=torch.float64)
            out[h, i, : i + 1] = torch.softmax(logits, 0)
    return out


def _kept(selection, head: int) -> list[int]:
    idx = selection.indices[0, min(head, selection.indices.shape[1] - 1)]
    ok = selection.kept[0, min(head, selection.kept.shape[1] - 1)]
    return sorted(idx[ok].tolist())


def _ref_top(score: list[float], forced: set[int], k: int) -> list[int]:
    order = sorted(range(len(score)), key=lambda j: (j not in forced, -score[j], j))
    return sorted(order[:k])


# --------------------------------------------------------------------------------------------- CORM
@pytest.mark.parametrize("window", [1, 4, 8])
def test_corm_keeps_what_the_reference_keeps(window):
    q, k, v = _tensors(1)
    policy = kvpolicy.load_policy({"budget": {"ratio": 0.5, "sink": 2}, "scorer": {"name": "corm", "window": window}})
    ctx = _ctx(policy, q, k, v)
    sel, _ = run_steps(ctx, policy.scorer, None, policy.selector, policy.merger)
    A = _attention(q, k)
    budget = S // 2
    for kv in range(HKV):
        score = [max(float(A[h, i, j]) * (i + 1) for h in range(kv * G, kv * G + G) for i in range(S - window, S))
                 for j in range(S)]
        window_entries = set(range(S - window, S))
        score = [1e9 + j if j in window_entries else score[j] for j in range(S)]
        assert _kept(sel, kv) == _ref_top(score, {0, 1}, budget), kv


def test_corm_threshold_keeps_entries_above_the_uniform_share():
    q, k, v = _tensors(2)
    policy = kvpolicy.load_policy({"budget": {"ratio": 0.9, "sink": 1}, "scorer": {"name": "corm", "window": 4},
                                   "selector": {"name": "corm-threshold", "lam": 3.0}})
    ctx = _ctx(policy, q, k, v)
    sel, _ = run_steps(ctx, policy.scorer, None, policy.selector, policy.merger)
    A = _attention(q, k)
    cap = int(S * 0.9)
    for kv in range(HKV):
        rel = [max(float(A[h, i, j]) * (i + 1) for h in range(kv * G, kv * G + G) for i in range(S - 4, S))
               for j in range(S)]
        passing = {j for j in range(S) if rel[j] >= 3.0} | {0} | set(range(S - 4, S))
        assert len(passing) < cap  # the test is the binding rule here, not the budget
        assert set(_kept(sel, kv)) == passing, kv


@pytest.mark.parametrize(("preset", "budget", "seed", "pad", "heads"), [
    ("corm", {"ratio": 0.4, "sink": 2}, 3, 5, HKV),
    ("cascading", {"tokens": 9, "sink": 2}, 9, 4, 1),  # one decision per layer
])
def test_padding_independent(preset, budget, seed, pad, heads):
    q, k, v = _tensors(seed)
    policy = kvpolicy.load_policy(preset, budget=budget)
    alone = run_steps(_ctx(policy, q, k, v), policy.scorer, None, policy.selector, policy.merger)[0]
    qp = torch.cat([torch.zeros(1, H, pad, D), q], 2)
    kp, vp = (torch.cat([torch.zeros(1, HKV, pad, D), x], 2) for x in (k, v))
    padded = run_steps(_ctx(policy, qp, kp, vp, pad=pad), policy.scorer, None, policy.selector, policy.merger)[0]
    for kv in range(heads):
        assert [j - pad for j in _kept(padded, kv)] == _kept(alone, kv)


# --------------------------------------------------------------------------------------------- CaM
def _ref_cam(A, v, kept_by_head, m, draws=None):
    """Reference CaM values for the kept entries of each KV head (float64)."""
    acc = [[sum(float(A[h, i, j]) for h in range(kv * G, kv * G + G) for i in range(S)) / G for j in range(S)]
           for kv in range(HKV)]  # group mean of the column sums, per KV head
    out = []
    for kv, kept in enumerate(kept_by_head):
        vals = {j: v[0, kv, j].double().clone() for j in kept}
        for i in range(S):
            if i in kept:
                continue
            after = [j for j in kept if j > i][:m]
            if not after:
                continue
            mean = sum(acc[kv][j] for j in after) / len(after)
            p = min(max(acc[kv][i] / mean, 0.0), 1.0) if mean > 0 else float(acc[kv][i] > 0)
            w = p if draws is None else float(draws[kv][i] < p)
            for j in after:
                vals[j] += w * v[0, kv, i].double() / m
        out.append(torch.stack([vals[j] for j in kept]))
    return out


@pytest.mark.parametrize("sample", [False, True])
@pytest.mark.parametrize("m", [1, 3])
def test_cam_merges_values_like_the_reference(sample, m):
    q, k, v = _tensors(4)
    policy = kvpolicy.load_policy("h2o-cam", budget={"ratio": 0.4, "sink": 2, "recent": 0.25},
                                  merger={"name": "cam", "merge_window": m, "sample": sample, "seed": 7})
    ctx = _ctx(policy, q, k, v)
    sel, merged = run_steps(ctx, policy.scorer, None, policy.selector, policy.merger)
    A = _attention(q, k)
    kept = [_kept(sel, kv) for kv in range(HKV)]
    draws = None
    if sample:  # the documented seeding: generator seed * 100003 + layer + 7919 * head, draw r for entry r
        draws = [torch.rand(S, generator=torch.Generator().manual_seed(7 * 100003 + 0 + 7919 * kv)).tolist()
                 for kv in range(HKV)]
    ref = _ref_cam(A, v, kept, m, draws)
    for kv in range(HKV):
        assert torch.allclose(merged.values[0, kv].double(), ref[kv], atol=1e-5), kv
        assert torch.equal(merged.keys[0, kv], k[0, kv, kept[kv]])  # keys untouched
    # H2O's selection is unchanged by the merger
    h2o = kvpolicy.load_policy("h2o", budget={"ratio": 0.4, "sink": 2, "recent": 0.25})
    sel_h2o, _ = run_steps(_ctx(h2o, q, k, v), h2o.scorer, None, h2o.selector, h2o.merger)
    assert torch.equal(sel_h2o.indices, sel.indices)
    assert merged.merged > 0


# --------------------------------------------------------------------------------------------- D2O
def test_d2o_merge_matches_the_reference():
    q, k, v = _tensors(5)
    policy = kvpolicy.load_policy("d2o", budget={"ratio": 0.3, "sink": 2, "recent": 0.25})
    ctx = _ctx(policy, q, k, v)
    sel, merged = run_steps(ctx, policy.scorer, None, policy.selector, policy.merger)
    for kv in range(HKV):
        kept = _kept(sel, kv)
        ev = [j for j in range(S) if j not in kept]
        kk = k[0, kv].double()
        best, sig = [], []
        for e in ev:
            cos = [float(kk[e] @ kk[c] / (kk[e].norm() * kk[c].norm())) for c in kept]
            best.append(max(range(len(kept)), key=lambda t: (cos[t], -t)))
            sig.append(cos[best[-1]])
        tau = sum(sig) / len(sig)
        for name, x, out in (("keys", k, merged.keys), ("values", v, merged.values)):
            xx = x[0, kv].double()
            for slot, c in enumerate(kept):
                num, den = math.e * xx[c], math.e
                for e, b_, s_ in zip(ev, best, sig):
                    if b_ == slot and s_ >= tau:
                        num, den = num + math.exp(s_) * xx[e], den + math.exp(s_)
                assert torch.allclose(out[0, kv, slot].double(), num / den, atol=1e-5), (name, kv, c)
    assert ctx.state["d2o_tau"].shape == (1, HKV)


def test_d2o_threshold_is_an_ema_over_compactions():
    q, k, v = _tensors(6)
    policy = kvpolicy.load_policy("d2o", budget={"ratio": 0.3, "sink": 2, "recent": 0.25})
    ctx = _ctx(policy, q, k, v)
    run_steps(ctx, policy.scorer, None, policy.selector, policy.merger)
    tau0 = ctx.state["d2o_tau"].clone()
    ctx2 = _ctx(policy, q, k.flip(2), v)
    ctx2.state = ctx.state
    run_steps(ctx2, policy.scorer, None, policy.selector, policy.merger)
    fresh = _ctx(policy, q, k.flip(2), v)
    run_steps(fresh, policy.scorer, None, policy.selector, policy.merger)
    assert torch.allclose(ctx2.state["d2o_tau"], 0.9 * tau0 + 0.1 * fresh.state["d2o_tau"])


def test_d2o_density_matches_the_reference():
    q, k, v = _tensors(7)
    policy = kvpolicy.load_policy("d2o")
    A = _attention(q, k)
    rows = [1.0 / ((i + 1) * float((A[h, i, : i + 1] ** 2).sum())) for h in range(H) for i in range(S // 2, S)]
    assert float(layer_density(_ctx(policy, q, k, v))[0]) == pytest.approx(sum(rows) / len(rows), rel=1e-5)


def test_d2o_schedule_follows_density_and_keeps_the_total():
    dens = [0.4, 0.1, 0.05, 0.02, 0.01, 0.01]
    policy = kvpolicy.load_policy("d2o-smollm2", layers={"name": "d2o-density", "shares": dens, "min_share": 0.25})
    n = torch.tensor([1000])
    totals = [int(b.total[0]) for b in policy.layer_budgets(6, n)]
    assert sum(totals) == 6 * 200
    shares = density_shares(dens, 6, 0.25)
    assert totals[0] > totals[1] > totals[2] > totals[3] and totals[4] == totals[5]
    assert abs(sum(shares) / 6 - 1) < 1e-9 and min(shares) >= 0.25 / (sum(max(d / (sum(dens) / 6), 0.25)
                                                                         for d in dens) / 6) - 1e-9
    # a 30-layer profile on a 2-layer model: interpolated over depth
    two = [int(b.total[0]) for b in kvpolicy.load_policy("d2o-smollm2").layer_budgets(2, n)]
    assert sum(two) == 400 and two[0] > two[1]


@pytest.mark.parametrize("merger", ["cam", "d2o"])
def test_mergers_keep_the_invariants_under_a_layer_shared_selection(merger):
    kit.check_component("merger", merger, base={"scorer": {"name": "tova"}, "budget": {"ratio": 0.5, "sink": 1}},
                        model=False)


# --------------------------------------------------------------------------------------------- SmolLM2
@pytest.fixture(scope="module")
def smol_runs(smollm2, smol_passage):
    model, tok = smollm2
    out = {}
    for name in ["h2o", "corm", "h2o-cam", "d2o", "d2o-smollm2"]:
        with torch.inference_mode(), kvpolicy.compress(model, name) as cache:
            gen = model.generate(input_ids=smol_passage, max_new_tokens=6, do_sample=False,
                                 pad_token_id=tok.eos_token_id, cache=cache)
        out[name] = (cache, gen)
    return out


def test_smollm2_sizes_and_generation(smol_runs, smol_passage):
    L = smol_passage.shape[1]
    n_layers = len(smol_runs["h2o"][0].layers)
    for name, (cache, gen) in smol_runs.items():
        assert gen.shape[1] == L + 6, name
        prefill = [layer.events[0] for layer in cache.layers if layer.events]  # a layer kept whole has none
        kept = [layer.events[0].tokens_kept if layer.events else L for layer in cache.layers]
        if name == "d2o-smollm2":
            want = [int(b.total[0]) for b in kvpolicy.load_policy(name).layer_budgets(n_layers, torch.tensor([L]))]
            assert kept == want and sum(kept) == n_layers * int(L * 0.2)
            assert kept[0] == L and kept[-1] < int(L * 0.2)  # the dense layer 0 keeps everything here
        else:
            assert kept == [int(L * 0.2)] * n_layers, name
        if name in ("h2o-cam", "d2o", "d2o-smollm2"):
            assert all(ev.tokens_merged > 0 for ev in prefill), name
        # 5 decode tokens appended after the prefill compression
        assert all(int(layer.valid[0, 0].sum()) == k + 5 for layer, k in zip(cache.layers, kept)), name


def test_cam_keeps_h2o_selection_on_smollm2(smol_runs):
    for a, b in zip(smol_runs["h2o"][0].layers, smol_runs["h2o-cam"][0].layers):
        assert torch.equal(a.positions, b.positions)


def test_calibration_on_smollm2_reproduces_the_profile_shape(smollm2, smol_passage):
    model, _ = smollm2
    dens = calibrate_density(model, smol_passage[:, :600])
    assert len(dens) == len(SMOLLM2_DENSITY) == 30
    assert all(0 < d <= 1 for d in dens)
    assert dens[0] == max(dens)  # layer 0 is by far the densest, as in the stored profile


# --------------------------------------------------------------------------------------------- Cascading KV cache
def _ref_cascade(order, score, sink, sizes, k):
    """Reference cascading cache: stream positions ``order`` one by one; returns the kept positions."""
    sinks, cas = [], [[] for _ in sizes]
    for step, tok in enumerate(order):
        if len(sinks) < sink:
            sinks.append(tok)
            continue
        u = step - sink
        moving = tok
        for i in range(len(sizes)):
            if u % (k ** i) == 0:
                cas[i].append(moving)
                if len(cas[i]) > sizes[i]:
                    moving = cas[i].pop(0)
                    continue
                moving = None
                break
            if len(cas[i]) == 0:
                cas[i].append(moving)
            elif score[moving] >= score[cas[i][-1]]:
                cas[i][-1] = moving
            moving = None
            break
    return sorted(sinks + [p for c in cas for p in c])


@pytest.mark.parametrize("cascades, k, budget", [(1, 2, 10), (2, 2, 10), (3, 2, 11), (4, 3, 9)])
def test_cascading_keeps_what_the_reference_keeps(cascades, k, budget):
    q, k_, v = _tensors(8)
    beta = 0.9
    policy = kvpolicy.load_policy({"budget": {"tokens": budget, "sink": 2}, "scorer": {"name": "cascade-ema", "beta": beta},
                                   "selector": {"name": "cascading", "cascades": cascades, "accept_every": k},
                                   "decode": {"name": "cascading"}})
    ctx = _ctx(policy, q, k_, v)
    sel, _ = run_steps(ctx, policy.scorer, None, policy.selector, policy.merger)
    A = _attention(q, k_)
    ema = [(1 - beta) * sum(beta ** (S - 1 - i) * float(A[:, i, j].mean()) for i in range(S)) for j in range(S)]
    room = budget - 2
    sizes = [room // cascades + (1 if i < room % cascades else 0) for i in range(cascades)]
    sizes = [x for x in sizes if x > 0]
    assert _kept(sel, 0) == _ref_cascade(list(range(S)), ema, 2, sizes, k)
    assert len(_kept(sel, 0)) <= budget
    scores = policy.scorer.score(_ctx(policy, q, k_, v))
    assert torch.allclose(scores[0, 0].double(), torch.tensor(ema, dtype=torch.float64), atol=1e-6)


def test_cascading_decode_streams_one_token_per_step(tiny_llama):
    ids = torch.randint(1, 128, (1, 60), generator=torch.Generator().manual_seed(0))
    policy = kvpolicy.load_policy("cascading", budget={"tokens": 20, "sink": 4})
    with torch.inference_mode(), kvpolicy.compress(tiny_llama, policy) as cache:
        tiny_llama.generate(input_ids=ids, attention_mask=torch.ones_like(ids), cache=cache, max_new_tokens=12,
                            do_sample=False, pad_token_id=0)
    for layer in cache.layers:
        phases = [e.phase for e in layer.events]
        assert phases[0] == "prefill" and phases.count("decode") == 11  # one compaction per fed-back token
        pos = layer.positions[0, 0][layer.valid[0, 0]].tolist()
        assert len(pos) <= 20 + 1 and pos[:4] == [0, 1, 2, 3]
        row = layer.state["cascade"][0]
        # 71 tokens seen; the last one (position 70) is streamed at the next step
        assert row.last_pos == 69 and sorted(row.kept()) == [p for p in pos if p <= 69]
        assert [len(c) for c in row.cascades] == row.sizes == [4, 4, 4, 4]
        assert pos[-1] == 70 and row.cascades[0] == [66, 67, 68, 69]  # cascade 0 is the most recent window
        assert row.cascades[3][0] < row.cascades[2][0] < row.cascades[1][0]  # deeper cascades reach further back


@pytest.mark.parametrize("kind, name", [("selector", "cascading"), ("scorer", "cascade-ema"), ("decode", "cascading")])
def test_cascading_steps_keep_the_invariants(kind, name):
    kit.check_component(kind, name, model=kind == "decode")


# --------------------------------------------------------------------------------------------- VL-Cache
def _vl_ctx(policy, q, k, v, img: range):
    ctx = _ctx(policy, q, k, v)
    ctx.is_image[:, :, img.start:img.stop] = True
    return ctx


@pytest.mark.parametrize("img, ratio", [(range(2, 14), 0.5), (range(2, 14), 0.9), (range(0, 0), 0.7),
                                        (range(10, 24), 0.5)])
def test_vlcache_keeps_what_the_reference_keeps(img, ratio):
    q, k, v = _tensors(10)
    q = q * 3  # sharper attention: some entries below 1 % of their row's max
    policy = kvpolicy.load_policy("vlcache", budget={"ratio": ratio, "sink": 2})
    ctx = _vl_ctx(policy, q, k, v, img)
    sel, _ = run_steps(ctx, policy.scorer, None, policy.selector, policy.merger)
    A = _attention(q, k)
    post = [i for i in range(S) if i > (img.stop - 1 if len(img) else -1)] or [S - 1]
    big = sum(int(float(A[h, i, j]) >= 0.01 * float(A[h, i, : i + 1].max())) for h in range(H) for i in post
              for j in range(i + 1))
    seen = sum(i + 1 for i in post) * H
    density = big / seen
    keep = min(int(S * ratio), max(2, math.ceil(density * S)))
    assert ctx.figures["vl_density"] == pytest.approx(density, abs=1e-6)
    for kv in range(HKV):
        score = [sum(float(A[h, i, j]) for i in post for h in range(kv * G, kv * G + G)) / G for j in range(S)]
        assert _kept(sel, kv) == _ref_top(score, {0, 1}, keep), kv


def test_vlcache_on_a_tiny_llava():
    from conftest import make_tiny_llava

    img_id, n_img = 100, 144
    model = make_tiny_llava(48, n_img, img_id)
    g = torch.Generator().manual_seed(1)
    ids = torch.cat([torch.randint(1, 100, (1, 6), generator=g), torch.full((1, n_img), img_id),
                     torch.randint(1, 100, (1, 14), generator=g)], 1)
    pixels = torch.randn(1, 3, 48, 48, generator=torch.Generator().manual_seed(3))
    # random weights attend almost uniformly (every entry within 20 % of its row max): tau = 0.97 makes them sparse
    policy = kvpolicy.load_policy("vlcache", budget=0.3, selector={"name": "vlcache-sparsity", "threshold": 0.97})
    with torch.inference_mode(), kvpolicy.compress(model, policy) as cache:
        out = model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                             cache=cache, pad_token_id=0)
    assert out.shape[1] == ids.shape[1] + 4
    L = ids.shape[1]
    for layer in cache.layers:
        ev = layer.events[0]
        want = min(int(L * 0.3), max(4, math.ceil(ev.figures["vl_density"] * L)))
        assert ev.tokens_kept == want == ev.figures["vl_kept"]
        assert 0 < ev.figures["vl_density"] <= 1
        assert ev.image_tokens_in == n_img and ev.image_tokens_kept < n_img
    assert any(layer.events[0].tokens_kept < int(L * 0.3) for layer in cache.layers)  # a sparse layer kept less


@pytest.mark.parametrize("kind, name", [("scorer", "post-vision"), ("selector", "vlcache-sparsity")])
def test_vlcache_steps_keep_the_invariants(kind, name):
    kit.check_component(kind, name, model=False)


def test_cascading_on_smollm2(smollm2, smol_passage):
    """500 tokens at budget 0.2: every layer holds 4 sinks + 4 full cascades (100 entries) after the prompt and
    keeps that size while generating (one entry in, one out per step, plus the token not yet streamed)."""
    model, tok = smollm2
    ids = smol_passage[:, :500]
    with torch.inference_mode(), kvpolicy.compress(model, "cascading") as cache:
        gen = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.eos_token_id,
                             cache=cache)
    assert gen.shape[1] == 504
    for layer in cache.layers:
        row = layer.state["cascade"][0]
        assert row.sizes == [24, 24, 24, 24] and [len(c) for c in row.cascades] == row.sizes
        assert int(layer.valid[0, 0].sum()) == 101 and layer.positions[0, 0, -1] == 502
        assert min(row.cascades[3]) < 502 - 200  # the deepest cascade reaches twice as far back as a 100-token window
