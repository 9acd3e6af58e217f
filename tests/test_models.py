"""Model families and mixed-layer models (issue 15).

Every family either works exactly at budget 1.0 (greedy tokens equal, logits within 1e-5 of plain ``generate``
at every step, with a left-padded batch) or is refused by name. Mixed models keep their sliding-window layers as
windows and compress their full-attention layers; soft-capping (Gemma 2) and learned sinks (gpt-oss) are computed
by the kvpolicy attention and by every statistic, checked against a naive reference written here.
"""

from __future__ import annotations

import math

import pytest
import torch
import transformers as tf

import kvpolicy
from kvpolicy import observe
from kvpolicy.errors import CacheUsageError, UnsupportedModelError

WINDOW = 8
MIXED = ["sliding_attention", "full_attention"] * 2
_SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, pad_token_id=0)


def _family(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(**_SMALL)).eval()
    if name == "qwen2":  # Qwen2's own window: sliding layers above max_window_layers
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**_SMALL, use_sliding_window=True, sliding_window=WINDOW,
                                                  max_window_layers=2)).eval()
    if name == "qwen3":
        return tf.Qwen3ForCausalLM(tf.Qwen3Config(**_SMALL, head_dim=16)).eval()
    if name == "mistral":  # a window on every layer (Mistral 7B v0.1): nothing to compress, all kept as windows
        return tf.MistralForCausalLM(tf.MistralConfig(**_SMALL, head_dim=16, sliding_window=WINDOW)).eval()
    if name == "phi3":
        return tf.Phi3ForCausalLM(tf.Phi3Config(**_SMALL)).eval()
    if name == "gemma2":  # soft-capped logits and mixed layers
        cfg = tf.Gemma2Config(**_SMALL, head_dim=16, sliding_window=WINDOW, layer_types=MIXED,
                              attn_logit_softcapping=2.0)
        cfg._attn_implementation = "eager"  # the reference: transformers 5.16's SDPA path drops the soft-cap
        model = tf.Gemma2ForCausalLM(cfg).eval()
        with torch.no_grad():  # random weights give logits ~1e-3, which a cap never touches: make them large
            for m in model.modules():
                if hasattr(m, "q_proj"):
                    m.q_proj.weight.mul_(40.0)
                    m.k_proj.weight.mul_(40.0)
        return model
    if name == "gemma3":
        return tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**_SMALL, head_dim=16, sliding_window=WINDOW,
                                                        layer_types=MIXED)).eval()
    if name == "gptoss":  # learned sinks and mixed layers
        model = tf.GptOssForCausalLM(tf.GptOssConfig(**{**_SMALL, "intermediate_size": 64}, head_dim=16,
                                                     sliding_window=WINDOW, layer_types=MIXED, num_local_experts=4,
                                                     num_experts_per_tok=2)).eval()
        for m in model.modules():
            if isinstance(getattr(m, "sinks", None), torch.nn.Parameter):
                torch.nn.init.normal_(m.sinks, std=1.0)  # zeros would hide a dropped sink less
        return model
    raise KeyError(name)


FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "phi3", "gemma2", "gemma3", "gptoss"]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param, _family(request.param)


def _batch(n: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (2, n), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding
    return ids, mask


def _generate(model, cache=None, new: int = 10, n: int = 30):
    ids, mask = _batch(n)
    kw = {} if cache is None else {"cache": cache}
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                              do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0, **kw)


def test_every_family_is_exact_at_budget_one(family):
    """A left-padded batch longer than the windows, decoding past the sliding layers' trim point."""
    name, model = family
    new = 80 if name in ("gemma3", "mistral") else 10  # 30 + 80 tokens: the windows trim while decoding too
    ref = _generate(model, new=new)
    with kvpolicy.compress(model, "full") as cache:
        out = _generate(model, cache, new=new)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    sliding = [layer.layer_idx for layer in cache.layers if layer.is_sliding]
    expect = {"qwen2": [2, 3], "mistral": [0, 1, 2, 3], "gemma2": [0, 2], "gemma3": [0, 2], "gptoss": [0, 2]}
    assert sliding == expect.get(name, [])
    for layer in cache.layers:
        if layer.is_sliding:  # a window layer holds at most window - 1 + the decode slack of 64 entries
            assert layer.physical_length <= WINDOW - 1 + 64
            if new == 80:
                assert layer.physical_length < 30 + new - 1, "the window was trimmed while decoding"


def test_mixed_models_compress_full_layers_and_keep_windows(family):
    name, model = family
    with kvpolicy.compress(model, "snapkv", budget=0.3) as cache:
        _generate(model, cache, new=4, n=60)
    report = cache.report()
    for row, layer in zip(report.layers, cache.layers, strict=True):
        if layer.is_sliding:
            assert row.left_alone == f"sliding window {WINDOW}: kept as a window"
            assert layer.physical_length == WINDOW - 1 + 3  # trimmed after the prefill, 3 decode tokens since
            assert [e.event for e in layer.events] == ["window"]
        else:
            assert row.left_alone == ""
            assert layer.physical_length == math.ceil(0.3 * 60) + 3  # the longer row's budget, then decoding
    assert "(sliding window 8: kept as a window)" in str(report) or name not in ("gemma2", "gemma3", "gptoss")
    assert report.bytes_now < report.bytes_full


def test_a_layer_type_kvpolicy_cannot_serve_is_refused_by_index():
    cfg = tf.Qwen3NextConfig(**{**_SMALL, "num_hidden_layers": 2}, head_dim=16,
                             layer_types=["linear_attention", "full_attention"], num_experts=2,
                             num_experts_per_tok=1, moe_intermediate_size=16, shared_expert_intermediate_size=16,
                             linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=8,
                             linear_value_head_dim=8)
    model = tf.Qwen3NextForCausalLM(cfg).eval()
    with pytest.raises(UnsupportedModelError, match=r"has layers the kvpolicy cache cannot serve \(0: "
                                                    r"'linear_attention'\); allowed: 'full_attention' layers"):
        with kvpolicy.compress(model, "snapkv"):
            pass
    assert model.config._attn_implementation != "kvpolicy"


def test_removing_tokens_that_left_a_window_is_refused():
    model = _family("gemma3")
    with kvpolicy.compress(model, "full") as cache:
        _generate(model, cache, new=2)
        with pytest.raises(CacheUsageError, match=r"layer 0: cannot remove the last 20 tokens: some of them fell out "
                                                  r"of its sliding window \(8\)"):
            cache.crop(-20)
        cache.crop(-1)  # the newest token is still held everywhere
        assert cache.get_seq_length() == 30  # 30 prompt tokens + 1 generated token fed back, 1 removed


# --------------------------------------------------------------------------- the forms against a naive reference
def _naive(q, k, v, qpos, kpos, bias, form, scaling=None):
    """softmax over the visible entries (+ the sink) of capped logits, written out per query head."""
    b, h, nq, d = q.shape
    g = h // k.shape[1]
    k, v, kpos, bias = (t.repeat_interleave(g, dim=1) for t in (k, v, kpos, bias))
    logits = (q @ k.transpose(-1, -2)) * (scaling if scaling is not None else d ** -0.5)
    if form.softcap is not None:
        logits = form.softcap * torch.tanh(logits / form.softcap)
    logits = logits + bias[:, :, None, :]
    rel = qpos[:, None, :, None] - kpos[:, :, None, :]
    hidden = rel < 0
    if form.window is not None:
        hidden |= rel >= form.window
    logits = logits.masked_fill(hidden, float("-inf"))
    if form.sinks is not None:
        sink = form.sinks.view(1, h, 1, 1).expand(b, h, nq, 1)
        probs = torch.softmax(torch.cat([logits, sink], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(logits, dim=-1)
    return probs @ v, probs.view(b, h // g, g, nq, -1).sum(3).mean(2)


@pytest.mark.parametrize("form", [observe.AttentionForm(softcap=3.0), observe.AttentionForm(sinks=torch.randn(4)),
                                  observe.AttentionForm(window=5), observe.AttentionForm(3.0, torch.randn(4), 5)],
                         ids=["softcap", "sinks", "window", "all"])
def test_statistics_and_attention_follow_the_model_form(form):
    g = torch.Generator().manual_seed(2)
    b, h, hkv, s, d = 2, 4, 2, 23, 8
    q = torch.randn(b, h, s, d, generator=g)
    k, v = torch.randn(b, hkv, s, d, generator=g), torch.randn(b, hkv, s, d, generator=g)
    qpos = torch.arange(s).expand(b, s)
    kpos = torch.arange(s).expand(b, hkv, s)
    bias = torch.zeros(b, hkv, s)
    bias[1, :, :4] = float("-inf")  # padding of row 1
    out, sums = observe.attention_with_colsum(q, k, v, scaling=d ** -0.5, query_pos=qpos, key_pos=kpos, key_bias=bias,
                                              form=form, max_bytes=4096)
    ref_out, ref_sums = _naive(q, k, v, qpos, kpos, bias, form)
    ok = torch.ones(b, s, dtype=torch.bool)
    ok[1, :4] = False  # padding queries see nothing (0 by convention here, NaN in the naive softmax)
    torch.testing.assert_close(out.transpose(1, 2)[ok], ref_out.transpose(1, 2)[ok], atol=1e-5, rtol=1e-5)
    ref_sums = torch.nan_to_num(_naive(q[:1], k[:1], v[:1], qpos[:1], kpos[:1], bias[:1], form)[1])
    torch.testing.assert_close(sums[:1], ref_sums, atol=1e-5, rtol=1e-5)
    plain, _ = observe.attention_with_colsum(q, k, v, scaling=d ** -0.5, query_pos=qpos, key_pos=kpos, key_bias=bias)
    assert (plain - out).abs().max() > 1e-3, "the form changes the attention"


@pytest.mark.parametrize("name", ["gemma2", "gptoss"])
def test_scores_see_the_form_the_model_attends_with(name):
    """SnapKV's window attention on a soft-capped / sink model is the model's own attention (eager reference)."""
    model = _family(name)
    seen = {}
    from kvpolicy import policy as pol

    orig = pol.CompressionContext.window_attention

    def spy(self, window):  # noqa: ANN001, ANN202
        res = orig(self, window)
        seen[self.layer_idx] = (self.form, self.scaling, res.clone(), self.queries[:, :, -window:].clone(),
                                self.keys.clone())
        return res

    pol.CompressionContext.window_attention = spy
    try:
        with kvpolicy.compress(model, "snapkv", budget=0.3) as cache:
            _generate(model, cache, new=1, n=60)
    finally:
        pol.CompressionContext.window_attention = orig
    assert sorted(seen) == [1, 3]  # the full-attention layers
    for form, scaling, res, q, k in seen.values():
        assert (form.softcap is not None) == (name == "gemma2") and (form.sinks is not None) == (name == "gptoss")
        b, _, w, _ = q.shape
        s = k.shape[2]
        pads = torch.arange(s) < torch.tensor([0, 5])[:, None, None]  # row 1's 5 pads
        _, ref = _naive(q, k, k, torch.arange(s - w, s).expand(b, w), torch.arange(s).expand(b, k.shape[1], s),
                        torch.zeros(b, k.shape[1], s).masked_fill(pads, float("-inf")), form, scaling)
        torch.testing.assert_close(res, ref, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------- the second real model
def test_gemma3_270m_full_budget_equals_plain_and_baselines_size_full_layers(gemma3, austen):
    """The packaged Gemma-3-270M on a 700-token Austen prompt (longer than its 512-token windows): budget 1.0
    gives plain ``generate``'s greedy tokens and logits at every step; each baseline at 0.2 leaves the 15
    sliding layers as windows and keeps its budget on the 3 full-attention layers."""
    model, tok = gemma3
    ids = tok(austen[8000:40000], return_tensors="pt").input_ids[:, :700]
    assert ids[0, 0] == tok.bos_token_id
    new = 8

    def run(cache=None):  # noqa: ANN001, ANN202
        kw = {} if cache is None else {"cache": cache}
        with torch.no_grad():
            return model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, output_logits=True,
                                  return_dict_in_generate=True, **kw)

    ref = run()
    with kvpolicy.compress(model, "full") as cache:
        out = run(cache)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    full = [i for i, t in enumerate(model.config.layer_types) if t == "full_attention"]
    assert full == [5, 11, 17]
    for name in ("snapkv", "h2o", "streaming", "knorm", "tova"):
        with kvpolicy.compress(model, name, budget=0.2) as cache:
            out = run(cache)
        report = cache.report()
        for row, layer in zip(report.layers, cache.layers, strict=True):
            if layer.layer_idx in full:
                assert (row.left_alone, layer.physical_length) == ("", 140 + new - 1), name
            else:
                assert (layer.is_sliding, layer.physical_length) == (True, 511 + new - 1), name
        assert report.bytes_now < 0.8 * report.bytes_full
        assert out.sequences.shape[1] == 700 + new


def test_a_quantized_cache_inside_the_block_is_refused_by_name(tiny_llama):
    """transformers' quantized caches (here its fp8 backend, which needs no extra package) do not compose with
    kvpolicy's cache in this version: refused, not stacked with bytes reported that are not held."""
    from transformers.cache_utils import QuantizedCache

    ids = torch.randint(3, 100, (1, 20))
    with kvpolicy.compress(tiny_llama, "snapkv") as cache:
        with pytest.raises(CacheUsageError, match=r"the model got a QuantizedCache .*kvpolicy's cache does not store "
                                                  r"quantized entries in this version"):
            tiny_llama(input_ids=ids, cache=QuantizedCache(backend="fp8", config=tiny_llama.config))
        tiny_llama(input_ids=ids, cache=cache)  # the block still works


def test_a_crop_that_would_leave_a_window_short_is_refused():
    """After a multi-token forward a window holds window - 1 entries: removing any would hide tokens the next
    query must see (transformers refuses it too)."""
    model = _family("gemma3")
    ids = torch.randint(3, 128, (1, 12))
    with torch.no_grad(), kvpolicy.compress(model, "full") as cache:
        model(input_ids=ids, cache=cache)
        model(input_ids=ids[:, :4], cache=cache)
        with pytest.raises(CacheUsageError, match=r"layer 0: cannot remove the last 2 tokens: some of them fell out"):
            cache.crop(-2)
        assert cache.get_seq_length() == 16


def test_layer_pooling_runs_when_the_top_layer_is_a_window():
    """Gemma-3-1B's last layer is a sliding one: the pool must run after the last full layer."""
    torch.manual_seed(0)
    cfg = tf.Gemma3TextConfig(**_SMALL, head_dim=16, sliding_window=WINDOW, layer_types=["full_attention",
                                                                                         "sliding_attention"] * 2)
    model = tf.Gemma3ForCausalLM(cfg).eval()
    ids, mask = _batch(100)
    with torch.no_grad(), kvpolicy.compress(model, "snapkv-global", budget=0.2) as cache:
        model(input_ids=ids, attention_mask=mask, cache=cache)
    full = [layer for layer in cache.layers if not layer.is_sliding]
    assert all(layer.alloc_key is None and [e.event for e in layer.events][-1] == "pool" for layer in full)
    kept = sum(int(layer.valid[0].sum()) for layer in full)  # row 0: 100 valid tokens, 2 layers x 2 KV heads
    assert kept == 4 * 20


def test_gemma3_vlm_bidirectional_images_are_refused_by_name():
    torch.manual_seed(0)
    text = dict(_SMALL, head_dim=16, sliding_window=WINDOW, layer_types=MIXED, vocab_size=300)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    cfg = tf.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=260,
                          boi_token_index=258, eoi_token_index=259)
    model = tf.Gemma3ForConditionalGeneration(cfg).eval()
    ids = torch.tensor([[2, 5, 6, 258] + [260] * 4 + [259, 7, 8, 9, 10]])
    kw = dict(input_ids=ids, pixel_values=torch.randn(1, 3, 28, 28), token_type_ids=(ids == 260).long())
    with torch.no_grad(), kvpolicy.compress(model, "full") as cache:
        with pytest.raises(UnsupportedModelError, match=r"image tokens marked by token_type_ids attend to each other "
                                                        r"in both directions"):
            model(**kw, cache=cache)
        text_ids = torch.tensor([[2, 5, 6, 7, 8, 9, 10]])
        model(input_ids=text_ids, cache=cache)  # text alone runs


def test_sinks_reach_each_head_of_a_ragged_layer_while_decoding():
    """AdaKV-style per-head counts (ragged layers) with decode-time accumulation on a sink model: each KV head's
    sub-layer gets its own query group's sinks (the dense padded layout is the reference)."""
    model = _family("gptoss")
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "q_proj"):
                m.q_proj.weight.mul_(20.0)
                m.k_proj.weight.mul_(20.0)
    policy = {"name": "ada-h2o-rolling", "budget": {"ratio": 0.3, "sink": 0}, "scorer": "accumulated-attention",
              "selector": {"name": "adaptive", "scope": "heads", "floor": 0.05}, "merger": "none",
              "decode": {"name": "rolling", "every": 4}}
    outs = []
    for ragged in (True, False):
        with kvpolicy.compress(model, policy) as cache:
            cache.ragged = ragged
            outs.append(_generate(model, cache, new=12, n=60))
        if ragged:
            assert any(layer.heads is not None for layer in cache.layers)
    assert torch.equal(outs[0].sequences, outs[1].sequences)
    for a, b in zip(outs[0].logits, outs[1].logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
