"""Core: the compressing cache inside model.generate(), positions, masks, padding, memory, errors."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import kvpolicy
from kvpolicy import observe
from kvpolicy.cache import KVPolicyCache
from kvpolicy.compat import cache_kwargs
from kvpolicy.errors import BudgetError, CacheUsageError, ConfigError, UnknownComponentError, UnsupportedModelError

from conftest import make_tiny_llama


def _left_padded_batch(vocab: int, lengths: tuple[int, int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = max(lengths)
    ids = torch.randint(3, vocab, (2, n), generator=g)
    mask = torch.ones(2, n, dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, : n - length] = 0
        ids[row, : n - length] = 0
    return ids, mask


def _generate(model, ids, mask, cache=None, steps=6):
    kw = {} if cache is None else {"cache": cache}
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=0, **kw)
    return out.sequences, torch.stack(out.logits, 1)


@pytest.mark.parametrize("preset", ["h2o", "snapkv", "tova", "knorm", "h2o-rolling"])
def test_budget_covering_everything_reproduces_plain_generate_tiny(tiny_llama, preset):
    ids, mask = _left_padded_batch(tiny_llama.config.vocab_size, (40, 29))
    ref_seq, ref_logits = _generate(tiny_llama, ids, mask)
    with kvpolicy.compress(tiny_llama, preset, budget=1.0) as cache:
        seq, logits = _generate(tiny_llama, ids, mask, cache)
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    # no entry was dropped: 40 prompt + 5 appended decode tokens, pads kept as invalid entries
    assert cache.layers[0].physical_length == 45
    assert cache.layers[0].valid[:, 0].sum(-1).tolist() == [45, 34]


def test_budget_covering_everything_reproduces_plain_generate_smollm2(smollm2, austen):
    model, tok = smollm2
    texts = [austen[1000:2400], austen[5000:5900]]
    tok.padding_side = "left"
    batch = tok(texts, return_tensors="pt", padding=True)
    assert (batch["attention_mask"][1] == 0).any(), "second row must be left padded"
    ref_seq, ref_logits = _generate(model, batch["input_ids"], batch["attention_mask"], steps=8)
    with kvpolicy.compress(model, "snapkv", budget=1.0) as cache:
        seq, logits = _generate(model, batch["input_ids"], batch["attention_mask"], cache, steps=8)
    assert torch.equal(seq, ref_seq)
    # transformers' own SDPA path handles GQA differently across releases (5.16 and 5.24 differ by 2e-5 here)
    torch.testing.assert_close(logits, ref_logits, atol=5e-5, rtol=0)


def test_model_is_left_exactly_as_before(tiny_llama):
    impl = tiny_llama.config._attn_implementation
    state = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    with kvpolicy.compress(tiny_llama, "snapkv") as cache:
        assert tiny_llama.config._attn_implementation == "kvpolicy"
        tiny_llama(input_ids=torch.randint(3, 100, (1, 50)), cache=cache)
    assert tiny_llama.config._attn_implementation == impl
    assert not tiny_llama._forward_pre_hooks
    assert all(torch.equal(v, state[k]) for k, v in tiny_llama.state_dict().items())
    # and the model works as before without the cache
    tiny_llama(input_ids=torch.randint(3, 100, (1, 10)))


def test_plain_forward_compresses_then_decodes_with_true_positions(tiny_llama):
    ids = torch.randint(3, 100, (1, 60))
    with torch.no_grad():
        ref_cache = DynamicCache()
        ref = tiny_llama(input_ids=ids, **cache_kwargs(tiny_llama, ref_cache)).logits[:, -1]
        nxt = ref.argmax(-1, keepdim=True)
        ref2 = tiny_llama(input_ids=nxt, **cache_kwargs(tiny_llama, ref_cache)).logits[:, -1]
        with kvpolicy.compress(tiny_llama, "h2o", budget=1.0) as cache:
            out = tiny_llama(input_ids=ids, cache=cache).logits[:, -1]
            out2 = tiny_llama(input_ids=nxt, cache=cache).logits[:, -1]
        with kvpolicy.compress(tiny_llama, "h2o", budget=0.25) as small:
            tiny_llama(input_ids=ids, cache=small)
            assert small.get_seq_length() == 60
            assert small.layers[0].physical_length == 15
            tiny_llama(input_ids=nxt, cache=small)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(out2, ref2, atol=1e-5, rtol=0)
    # the decoded token got its true position (60), not the physical length (15)
    assert small.layers[0].positions[0, 0, -1].item() == 60
    assert small.get_seq_length() == 61 and small.layers[1].physical_length == 16


def test_second_generate_on_the_same_cache(tiny_llama):
    """A multi-token forward after compression: logical positions and per-layer masks stay right."""
    ids = torch.randint(3, 100, (1, 48))
    turn2 = torch.randint(3, 100, (1, 12))
    with torch.no_grad():
        # full budget: two turns equal the plain two-turn run
        ref_cache = DynamicCache()
        tiny_llama(input_ids=ids, **cache_kwargs(tiny_llama, ref_cache))
        ref = tiny_llama(input_ids=turn2, **cache_kwargs(tiny_llama, ref_cache)).logits
        with kvpolicy.compress(tiny_llama, "snapkv", budget=1.0) as cache:
            tiny_llama(input_ids=ids, cache=cache)
            out = tiny_llama(input_ids=turn2, cache=cache).logits
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
        # compressed: generate() twice on the same cache
        with kvpolicy.compress(tiny_llama, "h2o", budget=0.25) as cache:
            first = tiny_llama.generate(input_ids=ids, cache=cache, max_new_tokens=4, do_sample=False,
                                        pad_token_id=0)
            assert cache.layers[0].physical_length == 12 + 3
            convo = torch.cat([first, turn2], dim=1)
            second = tiny_llama.generate(input_ids=convo, cache=cache, max_new_tokens=4, do_sample=False,
                                         pad_token_id=0)
    assert second.shape[1] == convo.shape[1] + 4
    n_seen = convo.shape[1] + 3
    assert cache.get_seq_length() == n_seen
    # turn 2 is a prefill event over all 64 tokens seen: int(0.25 * 64) = 16 entries, then 3 decoded
    assert [layer.physical_length for layer in cache.layers] == [16 + 3, 16 + 3]
    layer = cache.layers[0]
    pos = layer.positions[0, 0]
    assert torch.all(pos[1:] > pos[:-1]), "entries stay in ascending position order"
    assert pos[-1].item() == n_seen - 1


def test_chunked_colsum_equals_dense_eager(tiny_llama):
    torch.manual_seed(3)
    b, h, hkv, s, d = 2, 4, 2, 37, 16
    q = torch.randn(b, h, s, d)
    k = torch.randn(b, hkv, s, d)
    pos = torch.arange(s)
    valid = torch.ones(b, s, dtype=torch.bool)
    valid[1, :5] = False
    bias = torch.zeros(b, hkv, s).masked_fill(~valid[:, None, :], float("-inf"))
    got = observe.attention_colsum(q, k, scaling=d ** -0.5, query_pos=pos.expand(b, s),
                                   key_pos=pos.expand(b, hkv, s), key_bias=bias, query_valid=valid,
                                   max_bytes=4096)  # forces many chunks
    kk = k.repeat_interleave(h // hkv, dim=1)
    logits = q @ kk.transpose(-1, -2) * d ** -0.5
    causal = torch.ones(s, s).tril().bool()
    allowed = causal[None, None] & valid[:, None, None, :]
    probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1)
    probs = torch.nan_to_num(probs) * valid[:, None, :, None]
    dense = probs.sum(2).view(b, hkv, h // hkv, s).mean(2)
    torch.testing.assert_close(got, dense, atol=1e-5, rtol=1e-5)
    # invariant: every valid query spreads a total mass of 1 over the keys it sees
    torch.testing.assert_close(got.sum(-1), valid.sum(-1, keepdim=True).float().expand(b, hkv), atol=1e-4, rtol=0)


def _padded_gqa_layer(seed: int, b: int, h: int, hkv: int, s: int, d: int, pad: tuple[int, int]):
    """Random queries, keys, values of one layer, positions, validity (row ``pad[0]`` left-padded by ``pad[1]``)
    and a random logit bias (e.g. log n of merged entries), ``-inf`` on the padding."""
    torch.manual_seed(seed)
    q, k, v = torch.randn(b, h, s, d), torch.randn(b, hkv, s, d), torch.randn(b, hkv, s, d)
    valid = torch.ones(b, s, dtype=torch.bool)
    valid[pad[0], :pad[1]] = False
    bias = torch.randn(b, hkv, s).masked_fill(~valid[:, None, :], float("-inf"))
    return q, k, v, torch.arange(s), valid, bias


def test_fused_attention_with_colsum_equals_dense_attention():
    """One pass gives SDPA's output (for every valid query) and the same column sums as attention_colsum."""
    b, h, hkv, s, d = 2, 6, 2, 29, 8
    q, k, v, pos, valid, bias = _padded_gqa_layer(4, b, h, hkv, s, d, pad=(0, 7))
    kw = dict(scaling=d ** -0.5, query_pos=pos.expand(b, s), key_pos=pos.expand(b, hkv, s), key_bias=bias,
              query_valid=valid, max_bytes=2048)
    out, sums = observe.attention_with_colsum(q, k, v, **kw)
    torch.testing.assert_close(sums, observe.attention_colsum(q, k, **kw), atol=1e-6, rtol=0)
    g = h // hkv
    causal = torch.full((s, s), float("-inf")).triu(1)
    mask = (causal[None, None] + bias[:, :, None, :]).repeat_interleave(g, dim=1)
    kk, vv = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    ref = torch.softmax(q @ kk.transpose(-1, -2) * d ** -0.5 + mask, -1) @ vv
    rows = valid[:, None, :, None].expand_as(out)
    torch.testing.assert_close(out[rows], ref[rows], atol=1e-5, rtol=1e-5)
    assert bool((out[~rows] == 0).all()), "padding queries attend to nothing"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_group", [1, 2])
def test_statistics_by_kv_head_group_equal_all_heads_at_once(monkeypatch, per_group, dtype):
    """Long layers score a few KV heads at a time (their chunk's logits stay in the caches): the output, the column
    sums and maxima are those of all heads at once, with GQA, padding, a bias and per-head sinks."""
    b, h, hkv, s, d = 2, 6, 3, 41, 8
    q, k, v, pos, valid, bias = _padded_gqa_layer(5, b, h, hkv, s, d, pad=(1, 6))
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)  # the statistics run in fp32 whatever the cache's dtype
    form = observe.AttentionForm(sinks=torch.randn(h))
    kw = dict(scaling=d ** -0.5, query_pos=pos.expand(b, s), key_pos=pos.expand(b, hkv, s), key_bias=bias,
              query_valid=valid, max_bytes=2048, form=form)
    whole = (observe.attention_with_colsum(q, k, v, **kw), observe.attention_colsum(q, k, **kw),
             observe.attention_colmax(q, k, **kw))
    assert len(observe.kv_head_groups(b, h, hkv, s, s)) == 1
    per_head = b * (h // hkv) * s * 4 * min(s, observe.MIN_CHUNK_QUERIES)
    monkeypatch.setattr(observe, "HEAD_GROUP_BYTES", per_group * per_head)
    groups = observe.kv_head_groups(b, h, hkv, s, s)
    assert [(g.start, g.stop) for g in groups] == ([(0, 1), (1, 2), (2, 3)] if per_group == 1 else [(0, 2), (2, 3)])
    (out, sums), cols, colmax = (observe.attention_with_colsum(q, k, v, **kw), observe.attention_colsum(q, k, **kw),
                                 observe.attention_colmax(q, k, **kw))
    # (a group's chunks hold more queries, so its sums add in another order: rounding only)
    assert out.dtype == dtype and sums.dtype == torch.float32
    for got, want in zip((out.float(), sums, cols, colmax), (whole[0][0].float(), whole[0][1], whole[1], whole[2])):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    # and against a dense reference: every head's own sinks join its denominator
    g = h // hkv
    mask = (torch.full((s, s), float("-inf")).triu(1)[None, None] + bias[:, :, None, :]).repeat_interleave(g, dim=1)
    q, k, v = q.float(), k.float(), v.float()
    logits = q @ k.repeat_interleave(g, 1).transpose(-1, -2) * d ** -0.5 + mask
    sink = form.sinks.view(1, h, 1, 1).expand(b, h, s, 1)
    probs = torch.softmax(torch.cat([logits, sink], -1), -1)[..., :s] * valid[:, None, :, None]
    torch.testing.assert_close(cols, probs.sum(2).view(b, hkv, g, s).mean(2), atol=1e-5, rtol=1e-5)
    rows = valid[:, None, :, None].expand_as(out)
    ref = probs @ v.repeat_interleave(g, 1)
    torch.testing.assert_close(out.float()[rows], ref[rows], atol=1e-5 if dtype == torch.float32 else 2e-2,
                               rtol=1e-5 if dtype == torch.float32 else 2e-2)


def test_fused_prefill_compresses_exactly_like_sdpa_plus_statistic(tiny_llama, monkeypatch):
    """H2O's prefill takes the fused path under no_grad; turning it off changes nothing but the cost."""
    torch.manual_seed(5)
    ids = torch.randint(3, 100, (2, 40))
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    calls = []
    fused = KVPolicyCache.fused_prefill_attention

    def spy(self, *a, **kw):
        out = fused(self, *a, **kw)
        calls.append(out is not None)
        return out

    def run():
        with torch.no_grad(), kvpolicy.compress(tiny_llama, "h2o", budget=0.3) as cache:
            out = tiny_llama.generate(input_ids=ids, attention_mask=mask, cache=cache, max_new_tokens=5,
                                      do_sample=False, pad_token_id=0, output_logits=True,
                                      return_dict_in_generate=True)
        return out, [layer.positions.clone() for layer in cache.layers]

    monkeypatch.setattr(KVPolicyCache, "fused_prefill_attention", spy)
    out_fused, pos_fused = run()
    assert calls[:2] == [True, True], "the prefill of both layers ran fused"
    monkeypatch.setattr(KVPolicyCache, "fused_prefill_attention", lambda self, *a, **kw: None)
    out_sdpa, pos_sdpa = run()
    for a, b_ in zip(pos_fused, pos_sdpa):
        assert torch.equal(a, b_)
    assert torch.equal(out_fused.sequences, out_sdpa.sequences)
    for a, b_ in zip(out_fused.logits, out_sdpa.logits):
        torch.testing.assert_close(a, b_, atol=1e-4, rtol=1e-4)


def test_decode_steps_append_in_place(tiny_llama):
    """After the first decode step a layer grows inside its buffer (no copy of the whole layer per token),
    and the logits stay those of plain transformers."""
    ids = torch.randint(3, 100, (1, 30))
    steps = torch.randint(3, 100, (1, 8))
    with torch.no_grad():
        ref_cache = DynamicCache()
        tiny_llama(input_ids=ids, **cache_kwargs(tiny_llama, ref_cache))
        ref = [tiny_llama(input_ids=steps[:, i:i + 1], **cache_kwargs(tiny_llama, ref_cache)).logits for i in range(8)]
        with kvpolicy.compress(tiny_llama, "snapkv", budget=1.0) as cache:
            tiny_llama(input_ids=ids, cache=cache)
            got, ptrs = [], []
            for i in range(8):
                got.append(tiny_llama(input_ids=steps[:, i:i + 1], cache=cache).logits)
                ptrs.append({n: getattr(cache.layers[0], n).data_ptr() for n in ("keys", "values", "positions")})
    assert all(p == ptrs[0] for p in ptrs), "decode steps after the first reuse the layer's buffer"
    assert cache.layers[0].physical_length == 38
    for a, b_ in zip(got, ref):
        torch.testing.assert_close(a, b_, atol=1e-5, rtol=0)


def test_scoring_at_8k_allocates_no_LxL_buffer():
    model = make_tiny_llama(layers=1, heads=4, kv_heads=2, hidden=64)
    L = 8192
    ids = torch.randint(3, 100, (1, L))
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), kvpolicy.compress(model, "h2o", budget=0.1) as cache:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            model(input_ids=ids, cache=cache)
    assert cache.layers[0].physical_length == L // 10
    biggest = max(e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0)
    lxl_fp32 = L * L * 4
    assert biggest < lxl_fp32 / 4, f"largest single allocation {biggest} B vs L*L*4 = {lxl_fp32} B"


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("budget,needle", [
    ({"ratio": 0.0}, "ratio"), ({"ratio": 1.5}, "ratio"), ({"ratio": -0.2}, "ratio"),
    ({"tokens": -5}, "tokens"), ({"tokens": 0}, "tokens"), ({"tokens": 10, "recent": 20}, "recent"),
    ({"ratio": 0.2, "tokens": 10}, "exactly one"), ({"ratio": 0.2, "recent": 1.5}, "recent"),
    ({"ratio": 0.2, "sink": -1}, "sink"),
    # issue 12: h2o's 4 sinks do not fit 3 tokens; sinks + a recent count larger than the budget
    ({"tokens": 3}, "budget.sink=4 sink tokens do not fit a budget of 3 tokens"),
    ({"tokens": 10, "sink": 4, "recent": 8}, "budget.sink=4 + budget.recent=8"),
])
def test_bad_budgets_name_the_value_and_what_is_allowed(budget, needle):
    with pytest.raises(ConfigError) as err:
        kvpolicy.load_policy("h2o", budget=budget)
    msg = str(err.value)
    assert needle in msg and "budget" in msg


def test_sinks_larger_than_a_token_budget_are_refused_not_cut():
    """Issue 12: ``Budget(tokens=3, sink=4)`` was accepted and the selectors silently kept 3 of the 4 sinks."""
    from pydantic import ValidationError

    from kvpolicy.policy import Budget

    with pytest.raises(ValidationError, match=r"budget\.sink=4 sink tokens do not fit a budget of 3 tokens.*"
                                              r"allowed: 0 <= sink <= tokens"):
        Budget(tokens=3, sink=4)
    with pytest.raises(ValidationError, match=r"budget\.sink=4 \(the default\)"):
        Budget(tokens=3)
    assert Budget(tokens=4, sink=4).sink == 4 and Budget(tokens=3, sink=0).tokens == 3
    assert Budget(ratio=0.01, sink=4).sink == 4  # a ratio's size is known only per sequence


def test_float_override_out_of_range():
    with pytest.raises(ConfigError, match=r"budget\.ratio.*1\.5"):
        kvpolicy.load_policy("snapkv", budget=1.5)


def test_unknown_preset_suggests_close_names():
    with pytest.raises(UnknownComponentError) as err:
        kvpolicy.load_policy("snapvk")
    assert "'snapkv'" in str(err.value) and "allowed:" in str(err.value)


def test_recent_window_larger_than_runtime_budget_fails_before_any_layer_changes(tiny_llama):
    ids = torch.randint(3, 100, (1, 50))
    with kvpolicy.compress(tiny_llama, "h2o", budget={"ratio": 0.2, "recent": 30}) as cache:
        with pytest.raises(BudgetError, match=r"recent window of 30 tokens is larger than the budget of 10"):
            tiny_llama(input_ids=ids, cache=cache)
        assert all(layer.physical_length == 0 for layer in cache.layers), "nothing compressed halfway"


def test_cache_used_outside_its_block_or_with_another_cache(tiny_llama):
    ids = torch.randint(3, 100, (1, 20))
    with kvpolicy.compress(tiny_llama, "snapkv") as cache:
        with pytest.raises(CacheUsageError, match="call the model with cache=cache"):
            tiny_llama(input_ids=ids, cache=DynamicCache())
    with pytest.raises(CacheUsageError, match="not attached"):  # outside the block: the model's own keyword
        tiny_llama(input_ids=ids, **cache_kwargs(tiny_llama, cache))


# ------------------------------------------------------------------------------------------ dtypes
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_caches_compress_without_nan(dtype):
    model = make_tiny_llama(layers=2).to(dtype)
    ids, mask = _left_padded_batch(model.config.vocab_size, (64, 50))
    with torch.no_grad(), kvpolicy.compress(model, "snapkv", budget=0.25) as cache:
        out = model.generate(input_ids=ids, attention_mask=mask, cache=cache, max_new_tokens=5,
                             do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    assert cache.layers[0].keys.dtype == dtype
    assert all(torch.isfinite(x).all() for x in out.logits)
    # row budgets follow each row's own valid length: 16 and 12 real entries, row 1 padded with fillers
    assert cache.layers[0].valid[:, 0, :16].sum(-1).tolist() == [16, 12]
