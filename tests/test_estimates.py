"""The statistic's fast paths (issue 17): the exact fused pass is unchanged, and each seed method's ``-fast``
preset estimates its accumulated attention from every 16th prefill query, checked against naive references."""

from __future__ import annotations

import pytest
import torch

import kvpolicy
from kvpolicy import observe
from kvpolicy.compat import cache_kwargs
from kvpolicy.registry import ESTIMATE_STRIDE, Preset, estimated, get_registry
from kvpolicy.testing import Case, make_context, make_inputs, tiny_model

SEEDS = ("h2o", "h2o-mass", "lookm-avg", "lookm-pivot", "lookm-weighted", "elastic-cache", "kvmerger",
         "kvmerger-exact")


def _naive_colsum(q: torch.Tensor, k: torch.Tensor, qpos: torch.Tensor, scale: float) -> torch.Tensor:
    """Column sums of the causal softmax by the full ``[Q, S]`` matrix, group-averaged ``[B, Hkv, S]``."""
    g = q.shape[1] // k.shape[1]
    logits = (q.double() @ k.double().repeat_interleave(g, 1).transpose(-1, -2)) * scale
    kpos = torch.arange(k.shape[2])
    logits = logits.masked_fill(kpos[None, None, None, :] > qpos[:, None, :, None], float("-inf"))
    probs = logits.softmax(-1).sum(2)  # [B, H, S]
    return probs.view(k.shape[0], k.shape[1], g, -1).mean(2)


def _naive_estimate(q: torch.Tensor, k: torch.Tensor, stride: int, tail: int) -> torch.Tensor:
    """The ratio estimate by hand: the last ``tail`` queries and every ``stride``-th one before them; each key's sum
    times (queries that see it) / (sampled queries that see it)."""
    L = q.shape[2]
    t = min(L, tail)
    pick = torch.tensor(list(range(L - t - 1, -1, -stride))[::-1] + list(range(L - t, L)), dtype=torch.long)
    sums = _naive_colsum(q[:, :, pick], k, pick[None].expand(q.shape[0], -1), k.shape[-1] ** -0.5)
    keys = torch.arange(L)
    return sums * (L - keys).double() / (pick[:, None] >= keys[None]).sum(0).double()


@pytest.mark.parametrize("stride", [1, 3, 16])
def test_estimated_colsum_is_the_ratio_estimate_and_a_padded_row_equals_it_alone(stride):
    gen = torch.Generator().manual_seed(stride)
    L, pad = 90, 17
    q = torch.randn(1, 4, L, 8, generator=gen) * 2
    k = torch.randn(1, 2, L, 8, generator=gen) * 2
    pos = torch.arange(L)[None]
    got = observe.estimated_colsum(q, k, stride=stride, scaling=8 ** -0.5, query_pos=pos,
                                   key_pos=pos[:, None].expand(1, 2, L))
    want = _naive_colsum(q, k, pos, 8 ** -0.5) if stride == 1 else _naive_estimate(q, k, stride, tail=32)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    # the same row left-padded in a batch of 2 (pads: invalid queries and -inf keys) gives the same sums
    qb = torch.cat([torch.randn(1, 4, pad, 8, generator=gen), q], 2).repeat(2, 1, 1, 1)
    kb = torch.cat([torch.randn(1, 2, pad, 8, generator=gen), k], 2).repeat(2, 1, 1, 1)
    valid = torch.ones(2, L + pad, dtype=torch.bool)
    valid[1, :pad] = False
    bpos = (valid.cumsum(-1) - 1).clamp_min(0)
    bias = torch.zeros(2, 2, L + pad).masked_fill(~valid[:, None], float("-inf"))
    batch = observe.estimated_colsum(qb, kb, stride=stride, scaling=8 ** -0.5, query_pos=bpos,
                                     key_pos=bpos[:, None].expand(2, 2, -1), key_bias=bias, query_valid=valid)
    torch.testing.assert_close(batch[1, :, pad:], got[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("length", [5, 300, 1100])
def test_fused_pass_equals_the_naive_statistic_and_sdpa(length):
    """Chunks, the in-place softmax and the matrix-vector column sums change nothing (GQA 3, 2 rows)."""
    gen = torch.Generator().manual_seed(length)
    q = torch.randn(2, 6, length, 16, generator=gen) * 2
    k, v = torch.randn(2, 2, length, 16, generator=gen) * 2, torch.randn(2, 2, length, 16, generator=gen)
    pos = torch.arange(length).expand(2, -1)
    out, sums = observe.attention_with_colsum(q, k, v, scaling=0.25, query_pos=pos, key_pos=pos[:, None].expand(2, 2, -1),
                                              max_bytes=64 * 1024)  # many chunks
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, scale=0.25)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sums.double(), _naive_colsum(q, k, pos, 0.25), rtol=1e-5, atol=1e-5)


def test_every_seed_method_has_a_fast_preset_one_setting_from_the_faithful_one():
    presets = get_registry().presets
    for name in SEEDS:
        fast = kvpolicy.load_policy(f"{name}-fast").to_config()
        exact = kvpolicy.load_policy(name).to_config()
        assert fast["scorer"].pop("query_stride") == ESTIMATE_STRIDE
        assert exact["scorer"].pop("query_stride") == 1
        for cfg in (fast, exact):
            cfg.pop("name"), cfg.pop("description")
        assert fast == exact, name  # nothing else differs
        assert presets[f"{name}-fast"].obj.config["scorer"]["query_stride"] == ESTIMATE_STRIDE
    with pytest.raises(ValueError, match="already estimates"):
        estimated(Preset("x", {"scorer": {"name": "accumulated-attention", "query_stride": 8}}))


@pytest.mark.parametrize("stride", [1, 4])
def test_elastic_importance_estimates_from_every_stride_th_query(stride):
    """Elastic Cache's importance with ``query_stride``: the head mean of the strided column sums times the
    stride (queries L-1, L-1-s, ...), against the naive softmax."""
    policy = kvpolicy.load_policy("elastic-cache")
    scorer = type(policy.scorer)(query_stride=stride)
    case = Case(batch=1, kv_heads=2, group=2, seq=40, head_dim=8, dtype=torch.float32, pads=(0,), pattern="random",
                image_share=0.0, budget={"ratio": 0.5}, layer_idx=0, n_layers=1, seed=3)
    inputs = make_inputs(case)
    ctx = make_context(policy, case, inputs)
    got = scorer.score(ctx)
    want = _naive_estimate(inputs.queries, inputs.keys, stride, tail=32)
    torch.testing.assert_close(got.double(), want.mean(1, keepdim=True), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["h2o", "lookm-pivot", "elastic-cache", "kvmerger-exact"])
def test_fast_presets_skip_the_fused_pass_and_estimate_once_per_layer(name, monkeypatch):
    """On the tiny Llama: a ``-fast`` preset never runs the fused prefill statistic; each layer estimates once with
    stride 16 (the mergers that weight by attention reuse it), and it keeps the entries of the faithful preset with
    ``query_stride`` set by hand. The faithful preset computes the statistic inside the prefill attention."""
    model = tiny_model()
    ids = torch.randint(3, 96, (1, 200), generator=torch.Generator().manual_seed(0))
    calls: list[int] = []
    real = observe.estimated_colsum

    def spy(*args, **kw):
        calls.append(kw["stride"])
        return real(*args, **kw)

    monkeypatch.setattr(observe, "estimated_colsum", spy)
    by_hand = kvpolicy.load_policy(name).to_config()
    by_hand["scorer"]["query_stride"] = ESTIMATE_STRIDE
    kept = []
    for policy in (kvpolicy.load_policy(f"{name}-fast"), kvpolicy.load_policy(by_hand)):
        calls.clear()
        with torch.no_grad(), kvpolicy.compress(model, policy) as cache:
            assert not cache._wants_acc
            model(input_ids=ids, **cache_kwargs(model, cache))
            kept.append([layer.positions.clone() for layer in cache.layers])
        assert calls == [ESTIMATE_STRIDE] * len(cache.layers)
    for a, b in zip(*kept):
        assert torch.equal(a, b)
    calls.clear()
    with torch.no_grad(), kvpolicy.compress(model, name) as cache:
        assert cache._wants_acc
        model(input_ids=ids, **cache_kwargs(model, cache))
    assert calls == []  # exact: from the fused prefill attention, no separate pass


def _naive_band_estimate(q: torch.Tensor, k: torch.Tensor, stride: int, tail: int, band: int) -> torch.Tensor:
    """The estimate with each query's log-sum-exp: every query's attention to the keys less than ``band``
    positions back is exact; the farther pairs come from the sample, ratio-scaled over the queries that see a key
    from at least ``band`` positions on."""
    L, g = q.shape[2], q.shape[1] // k.shape[1]
    logits = (q.double() @ k.double().repeat_interleave(g, 1).transpose(-1, -2)) * k.shape[-1] ** -0.5
    i, j = torch.arange(L)[:, None], torch.arange(L)[None]
    probs = logits.masked_fill(j > i, float("-inf")).softmax(-1)  # [B, H, L, L]
    near = probs.masked_fill(j <= i - band, 0.0).sum(2)
    t = min(L, tail)
    pick = torch.tensor(list(range(L - t - 1, -1, -stride))[::-1] + list(range(L - t, L)), dtype=torch.long)
    far = probs[:, :, pick].masked_fill(j > pick[:, None] - band, 0.0).sum(2)
    keys = torch.arange(L)
    every = (L - (keys + band)).clamp_min(0).double()
    sampled = (pick[:, None] >= keys[None] + band).sum(0).double().clamp_min(1)
    est = near + far * every / sampled
    return est.view(q.shape[0], k.shape[1], g, L).mean(2)


@pytest.mark.parametrize("stride", [4, 16])
def test_the_log_sum_exp_estimate_is_exact_near_and_sampled_far(stride):
    """``estimated_colsum(..., lse=)`` against the naive matrix, with the kernel's own log-sum-exp
    (:func:`kvpolicy.integrate.sdpa_with_lse`), and a left-padded row in a batch equals the row alone."""
    from kvpolicy.integrate import sdpa_with_lse

    gen = torch.Generator().manual_seed(stride)
    L, pad, band = 300, 23, 64
    q = torch.randn(1, 4, L, 8, generator=gen) * 2
    k, v = torch.randn(1, 2, L, 8, generator=gen) * 2, torch.randn(1, 2, L, 8, generator=gen)
    out, lse = sdpa_with_lse(q, k, v, None, 8 ** -0.5, True)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=True, enable_gqa=True, scale=8 ** -0.5), rtol=1e-5, atol=1e-5)
    pos = torch.arange(L)[None]
    got = observe.estimated_colsum(q, k, stride=stride, scaling=8 ** -0.5, query_pos=pos,
                                   key_pos=pos[:, None].expand(1, 2, L), lse=lse, band=band)
    torch.testing.assert_close(got.double(), _naive_band_estimate(q, k, stride, 32, band), rtol=1e-4, atol=1e-5)
    # padded batch: pads are invalid queries and -inf keys; the mask lets a pad see itself (no empty row)
    qb = torch.cat([torch.randn(1, 4, pad, 8, generator=gen), q], 2).repeat(2, 1, 1, 1)
    kb = torch.cat([torch.randn(1, 2, pad, 8, generator=gen), k], 2).repeat(2, 1, 1, 1)
    vb = torch.cat([torch.randn(1, 2, pad, 8, generator=gen), v], 2).repeat(2, 1, 1, 1)
    valid = torch.ones(2, L + pad, dtype=torch.bool)
    valid[1, :pad] = False
    n = L + pad
    vis = valid[:, None, None, :] & (torch.arange(n)[None, :] <= torch.arange(n)[:, None])[None, None]
    vis |= torch.eye(n, dtype=torch.bool)[None, None]
    mask = torch.zeros(vis.shape).masked_fill(~vis, float("-inf"))
    _, blse = sdpa_with_lse(qb, kb, vb, mask, 8 ** -0.5, True)
    bpos = (valid.cumsum(-1) - 1).clamp_min(0)
    bias = torch.zeros(2, 2, n).masked_fill(~valid[:, None], float("-inf"))
    batch = observe.estimated_colsum(qb, kb, stride=stride, scaling=8 ** -0.5, query_pos=bpos,
                                     key_pos=bpos[:, None].expand(2, 2, -1), key_bias=bias, query_valid=valid,
                                     lse=blse, band=band)
    torch.testing.assert_close(batch[1, :, pad:], got[0], rtol=1e-4, atol=1e-5)


def test_fast_presets_read_the_prefill_kernels_log_sum_exp(monkeypatch):
    """In the cache, a ``-fast`` preset's estimate gets the log-sum-exp of the layer's prefill attention."""
    model = tiny_model()
    ids = torch.randint(3, 96, (1, 200), generator=torch.Generator().manual_seed(0))
    seen: list[bool] = []
    real = observe.estimated_colsum
    monkeypatch.setattr(observe, "estimated_colsum",
                        lambda *a, **kw: seen.append(kw.get("lse") is not None) or real(*a, **kw))
    with torch.no_grad(), kvpolicy.compress(model, "h2o-fast") as cache:
        model(input_ids=ids, **cache_kwargs(model, cache))
    assert seen == [True] * len(cache.layers)
    assert all(layer.query_lse is None for layer in cache.layers)  # dropped after the compression


@pytest.mark.parametrize("q_len,prefix,band,block", [(300, 0, 64, 32), (97, 45, 64, 32), (130, 7, 50, 16),
                                                      (5, 200, 64, 32), (64, 0, 8, 32), (700, 90, 64, 16),
                                                      (40, 30, 5000, 16)])
def test_the_blocked_estimate_equals_the_position_masked_one(q_len, prefix, band, block, monkeypatch):
    """Where positions are slots, the blocked estimate (augmented products, exp2) gives what the position-masked
    form gives, band and sampled part: GQA, two rows, queries after earlier entries, finite and ``-inf`` key
    biases, invalid queries, a band narrower than a block, groups of blocks and tiles of keys that do not divide."""
    gen = torch.Generator().manual_seed(q_len + prefix)
    s = q_len + prefix
    q = torch.randn(2, 6, q_len, 8, generator=gen) * 2
    k = torch.randn(2, 2, s, 8, generator=gen) * 2
    pos = torch.arange(s)[None].repeat(2, 1)
    pos[1] -= 3  # a row offset: positions are slots plus a constant
    bias = torch.randn(2, 2, s, generator=gen)
    bias[1, :, :3] = float("-inf")
    # each query's log-sum-exp over the entries it sees (-inf for one that sees only hidden entries)
    logits = (q @ k.repeat_interleave(3, 1).transpose(-1, -2)) * 8 ** -0.5 + bias.repeat_interleave(3, 1)[:, :, None]
    hidden = pos[:, None, None, :] > pos[:, None, s - q_len:, None]
    lse = logits.masked_fill(hidden, float("-inf")).logsumexp(-1)
    valid = torch.ones(2, q_len, dtype=torch.bool)
    valid[0, : q_len // 3] = False
    kw = dict(stride=5, scaling=8 ** -0.5, query_pos=pos[:, s - q_len:],
              key_pos=pos[:, None].expand(2, 2, s).contiguous(), key_bias=bias, query_valid=valid, lse=lse, band=band)
    assert observe._slots_are_positions(kw["query_pos"], kw["key_pos"], bias, valid)
    monkeypatch.setattr(observe, "BAND_BLOCK", block)
    monkeypatch.setattr(observe, "BAND_GROUP", 3)
    monkeypatch.setattr(observe, "FAR_TILE", 100)
    blocked = observe.estimated_colsum(q, k, **kw)
    est = observe._BlockedEstimate(q, k, lse, 8 ** -0.5, bias, valid, band)
    band_raw = est.band()
    assert bool(band_raw.isfinite().all())  # hidden entries come out tiny, never NaN (the last block's pad rows)
    band_only = band_raw.masked_fill(bias.isneginf(), 0.0)
    monkeypatch.setattr(observe, "_slots_are_positions", lambda *a: False)
    torch.testing.assert_close(blocked, observe.estimated_colsum(q, k, **kw), rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(band_only, observe._band_colsum(q, k, lse, 8 ** -0.5, kw["query_pos"], kw["key_pos"],
                                                               bias, valid, band), rtol=2e-5, atol=1e-6)


def test_positions_with_gaps_take_the_position_masked_band():
    """Entries with a gap in their positions (an earlier chunk compressed) are not "slots plus an offset"."""
    kpos = torch.cat([torch.arange(10), torch.arange(20, 40)])[None, None]
    assert not observe._slots_are_positions(torch.arange(20, 40)[None], kpos, None, None)
    assert observe._slots_are_positions(torch.arange(20, 40)[None], kpos[..., 10:], None, None)
    # an invalid last query with a pad's position does not decide the row's offset
    qpos, valid = torch.arange(20, 40)[None].clone(), torch.ones(1, 20, dtype=torch.bool)
    qpos[0, -1], valid[0, -1] = 0, False
    assert observe._slots_are_positions(qpos, kpos[..., 10:], None, valid)
    assert not observe._slots_are_positions(qpos, kpos[..., 10:], None, None)
