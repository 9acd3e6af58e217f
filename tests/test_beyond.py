"""Mass-preserving mergers and the context-reconstruction scorer (plugins/kvpolicy_beyond)."""

from __future__ import annotations

import math

import pytest
import torch

import kvpolicy
from kvpolicy import observe
from kvpolicy.integrate import reconstruct, sdpa
from kvpolicy.policy import CompressionContext, LayerBudget, Selection
from kvpolicy_beyond import MassMerge, MassPivotal, Reconstruction
from kvpolicy_beyond.merge import merge_filter

from tests.conftest import make_tiny_llama


def _ctx(keys, values, mult=None, bias=None, valid=None, acc=None):
    b, h, s, _ = keys.shape
    budget = LayerBudget(total=torch.tensor([s]), sink=0, recent=torch.tensor([0]))
    valid = valid if valid is not None else torch.ones(b, h, s, dtype=torch.bool)
    key_bias = None
    if bias is not None or not bool(valid.all()):
        key_bias = (bias if bias is not None else torch.zeros(b, h, s)).masked_fill(~valid, float("-inf"))
    return CompressionContext(layer_idx=0, n_layers=1, phase="decode", keys=keys, values=values,
                              positions=torch.arange(s).expand(b, h, s), valid=valid,
                              is_image=torch.zeros(b, h, s, dtype=torch.bool), budget=budget, scaling=0.5,
                              key_bias=key_bias, accumulated=acc, multiplicity=mult)


def _sel(idx, b=1):
    idx = torch.tensor(idx).expand(b, 1, len(idx))
    return Selection(indices=idx, kept=torch.ones_like(idx, dtype=torch.bool))


def _attend(q, keys, values, bias=None):
    mask = None if bias is None else bias[:, :, None, :].expand(-1, -1, q.shape[2], -1).float()
    return sdpa(q, keys, values, mask, 0.5, causal=False)


def test_merged_identical_entries_give_exact_attention():
    torch.manual_seed(0)
    # 6 entries: 1 and 4 are copies of 0 (3 tokens), 5 a copy of 2; keep 0, 2, 3
    k = torch.randn(1, 1, 4, 8)
    v = torch.randn(1, 1, 4, 8)
    order = [0, 1, 2, 3, 0, 2]
    keys, values = k[:, :, order], v[:, :, order]
    ctx = _ctx(keys, values, acc=torch.ones(1, 1, 6))
    for weights in ("count", "attention", "similarity"):
        m = MassMerge(weights=weights, mass="count").merge(ctx, _sel([0, 2, 3]), torch.zeros(1, 1, 6))
        n = m.multiplicity[0, 0]
        assert n.sum() == 6 and n[0] >= 2 and n[1] >= 2  # the copies went to their originals
        q = torch.randn(1, 2, 5, 8)  # 2 query heads share the KV head (GQA)
        # without the non-duplicate entry 1, the merged cache attends exactly like the full one
        sub = [0, 2, 3, 4, 5]
        dup = _attend(q, keys[:, :, sub], values[:, :, sub])
        m2 = MassMerge(weights=weights, mass="count", threshold=0.9999).merge(
            _ctx(keys[:, :, sub], values[:, :, sub], acc=torch.ones(1, 1, 5)), _sel([0, 1, 2]), torch.zeros(1, 1, 5))
        assert m2.multiplicity.tolist() == [[[2.0, 2.0, 1.0]]]
        torch.testing.assert_close(_attend(q, m2.keys, m2.values, m2.bias), dup, atol=1e-5, rtol=1e-5)


def test_bias_is_log_n_and_multiplicities_add_up_through_repeated_merges():
    torch.manual_seed(1)
    keys, values = torch.randn(2, 3, 10, 4), torch.randn(2, 3, 10, 4)
    mult = torch.randint(1, 4, (2, 3, 10)).float()
    ctx = _ctx(keys, values, mult=mult, bias=mult.log())
    m = MassMerge(weights="count").merge(ctx, _sel([0, 3, 7], b=2), torch.zeros(2, 3, 10))
    torch.testing.assert_close(m.multiplicity.sum(-1), mult.sum(-1))  # every token is accounted for
    torch.testing.assert_close(m.bias, m.multiplicity.log())
    torch.testing.assert_close(m.keys, keys[:, :, [0, 3, 7]])  # value-only: survivors' keys unchanged


def test_identity_when_nothing_is_evicted():
    torch.manual_seed(2)
    keys, values = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)
    ctx = _ctx(keys, values, acc=torch.rand(1, 2, 5))
    for merger in (MassMerge(), MassMerge(keys="mean", mass="weight"), MassPivotal()):
        m = merger.merge(ctx, _sel([0, 1, 2, 3, 4]), torch.zeros(1, 2, 5))
        assert torch.equal(m.keys, keys) and torch.equal(m.values, values)
        assert torch.equal(m.multiplicity, torch.ones(1, 2, 5))
        assert m.bias is None or torch.equal(m.bias, torch.zeros(1, 2, 5))


def test_attention_weighted_fold_and_weight_bias_hand_computed():
    # one head, kept entry 0 (attention 1) receives entry 1 (attention 3): v' = (1*v0 + 3*v1) / 4
    keys = torch.tensor([[[[1.0, 0.0], [1.0, 0.1]]]])
    values = torch.tensor([[[[4.0, 0.0], [0.0, 8.0]]]])
    ctx = _ctx(keys, values, acc=torch.tensor([[[1.0, 3.0]]]))
    m = MassMerge(weights="attention", mass="weight").merge(ctx, _sel([0]), torch.zeros(1, 1, 2))
    torch.testing.assert_close(m.values, torch.tensor([[[[1.0, 6.0]]]]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m.bias, torch.tensor([[[math.log(4.0)]]]), atol=1e-5, rtol=1e-5)
    assert m.multiplicity.item() == 2.0
    # below the cosine threshold the evicted entry is dropped: the survivor is unchanged
    m = MassMerge(threshold=0.9999).merge(ctx, _sel([0]), torch.zeros(1, 1, 2))
    assert torch.equal(m.values, values[:, :, :1]) and m.multiplicity.item() == 1.0


def test_padding_is_never_merged_and_per_head_quantile():
    keys, values = torch.randn(1, 1, 4, 4), torch.randn(1, 1, 4, 4)
    valid = torch.tensor([[[False, True, True, True]]])
    m = MassMerge(weights="count").merge(_ctx(keys, values, valid=valid), _sel([1, 2]), torch.zeros(1, 1, 4))
    assert m.multiplicity.sum().item() == 3.0
    sigma = torch.tensor([[[0.1, 0.5, 0.9, 0.7], [0.2, 0.2, 0.8, 0.0]]])
    use = merge_filter(sigma, torch.ones(1, 2, 4, dtype=torch.bool), -1.0, 0.5)
    assert use.tolist() == [[[False, False, True, True], [True, True, True, False]]]


def test_mass_pivotal_counts_and_bias():
    torch.manual_seed(3)
    keys, values = torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 4)
    m = MassPivotal().merge(_ctx(keys, values), _sel([1, 5]), torch.zeros(1, 2, 8))
    assert m.multiplicity.sum(-1).tolist() == [[8.0, 8.0]]
    torch.testing.assert_close(m.bias, m.multiplicity.log())
    v = MassPivotal(keys="keep").merge(_ctx(keys, values), _sel([1, 5]), torch.zeros(1, 2, 8))
    assert torch.equal(v.keys, keys[:, :, [1, 5]]) and torch.allclose(v.values, m.values)


def _policy(scorer: dict, ratio: float = 0.25, merger: dict | None = None) -> dict:
    return {"name": "t", "budget": {"ratio": ratio, "sink": 2}, "scorer": scorer, "selector": "topk",
            "merger": merger or {"name": "none"}, "decode": "none", "layers": "uniform"}


def _layer0_queries_keys(model, ids):
    """Post-RoPE queries ``[1, H, L, D]`` and keys ``[1, Hkv, L, D]`` of layer 0 (uncompressed)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    inner = model.model
    x = inner.layers[0].input_layernorm(inner.embed_tokens(ids))
    attn = inner.layers[0].self_attn
    b, n, _ = x.shape
    d = attn.head_dim
    q = attn.q_proj(x).view(b, n, -1, d).transpose(1, 2)
    k = attn.k_proj(x).view(b, n, -1, d).transpose(1, 2)
    cos, sin = inner.rotary_emb(x, torch.arange(n)[None])
    return (*apply_rotary_pos_emb(q, k, cos, sin), attn.scaling)


def test_reconstruction_scores_are_max_attention_of_the_reread():
    model = make_tiny_llama(layers=2, seed=5)
    torch.manual_seed(5)
    ids = torch.randint(1, 128, (1, 40))
    policy = _policy({"name": "reconstruction", "prompt": "", "chunk": 16})
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    with torch.no_grad(), kvpolicy.compress(model, policy) as cache:
        out = model(input_ids=ids, cache=cache).logits
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)  # deferral does not change the prefill
        layer = cache.layers[0]
        assert layer.physical_length == 10 and layer.n_seen == 40 and cache.get_seq_length() == 40
        nxt = model(input_ids=ids[:, :1], cache=cache).logits  # decode after compression works
        assert torch.isfinite(nxt).all() and cache.get_seq_length() == 41
    # the observation itself: an uncompressed cache, re-read without prompt = the context twice
    with torch.no_grad(), kvpolicy.compress(model, _policy({"name": "reconstruction", "prompt": "",
                                                              "chunk": 16}, ratio=1.0)) as cache:
        model(input_ids=ids, cache=cache)
        keys_before = cache.layers[0].keys.clone()
        cache.plan_input = (ids, None)
        reconstruct(model, cache)
        layer = cache.layers[0]
        assert torch.equal(layer.keys, keys_before) and layer.n_seen == 40  # observe-only: nothing kept
        got = layer.recon
        want = torch.zeros_like(got)
        # each chunk is read right after the context (positions 40...): it sees the context and itself
        for lo in range(0, 40, 16):
            q, k, scaling = _layer0_queries_keys(model, torch.cat([ids, ids[:, lo:lo + 16]], dim=1))
            n = k.shape[2]
            m = observe.attention_colmax(q[:, :, 40:], k, scaling=scaling, query_pos=torch.arange(40, n)[None],
                                         key_pos=torch.arange(n)[None, None].expand(1, k.shape[1], -1))
            want = torch.maximum(want, m[..., :40])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_reconstruction_cost_knobs_change_the_forwards():
    model = make_tiny_llama(layers=1, seed=6)
    ids = torch.randint(1, 128, (2, 64))
    am = torch.ones(2, 64, dtype=torch.long)
    am[1, :5] = 0  # left padding in row 1
    calls = []
    h = model.register_forward_pre_hook(lambda mod, a, kw: calls.append(kw["input_ids"].shape[1]), with_kwargs=True)
    try:
        for stride, tokens, want in ((1, None, [64, 16, 16, 16, 16]), (2, None, [64, 16, 16]), (1, 4, [64, 4, 4, 4, 4])):
            calls.clear()
            pol = _policy({"name": "reconstruction", "prompt": "", "chunk": 16, "stride": stride, "tokens": tokens})
            with torch.no_grad(), kvpolicy.compress(model, pol) as cache:
                model(input_ids=ids, attention_mask=am, cache=cache)
            assert calls == want
            layer = cache.layers[0]
            assert layer.valid[:, 0].sum(-1).tolist() == [16, 14]  # per-row budgets; pads never kept
    finally:
        h.remove()


def test_beyond_presets_generate_on_smollm2(smollm2, smol_passage):
    model, tok = smollm2
    n = 160
    ids = smol_passage[:, :n]
    with torch.inference_mode():
        for name in ("h2o-mass", "h2o-mass-keys", "lookm-pivot-mass", "kvzip-full", "kvzip-lite", "kvzip-lite-mass"):
            with kvpolicy.compress(model, name, tokenizer=tok) as cache:
                out = model.generate(input_ids=ids, cache=cache, max_new_tokens=3, do_sample=False)
            assert out.shape == (1, n + 3) and torch.equal(out[:, :n], ids)
            layer = cache.layers[5]
            assert layer.n_seen == n + 2
            assert int(layer.valid[0, 0].sum()) == n // 5 + 2  # budget 0.2 of the prompt, plus 2 decoded tokens
            if "mass" in name:
                assert layer.mult is not None and torch.allclose(layer.mult[0].sum(-1), torch.tensor(n + 2.0))
                torch.testing.assert_close(layer.bias, layer.mult.log())
