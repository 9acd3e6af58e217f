"""The cache's contract with the ways people call it: turns under and outside inference mode, assisted
generation and prompt lookup, modality overrides, models it cannot serve, a cache handed to another model."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import AutoModelForCausalLM

import kvpolicy
from kvpolicy.errors import CacheUsageError, UnsupportedModelError

from conftest import make_tiny_llama


def _gen(model, ids, cache=None, new=6, **kw):
    extra = {} if cache is None else {"cache": cache}
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                         do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0,
                         **extra, **kw)
    return out.sequences, torch.stack(out.logits, 1)


def test_a_turn_under_inference_mode_then_one_without_it(tiny_llama):
    """The CLI prefills under torch.inference_mode(); a second generate() on the same cache without it
    must not fail on the in-place decode buffers, and must give what two turns without it give."""
    g = torch.Generator().manual_seed(3)
    first = torch.randint(3, 100, (1, 50), generator=g)
    policy = kvpolicy.load_policy("snapkv", budget=0.5)

    def two_turns(inference_first: bool):
        with kvpolicy.compress(tiny_llama, policy) as cache:
            with torch.inference_mode(inference_first):
                seq, _ = _gen(tiny_llama, first, cache)
            second = torch.cat([seq, torch.randint(3, 100, (1, 7), generator=torch.Generator().manual_seed(4))], 1)
            with torch.no_grad():
                seq2, logits2 = _gen(tiny_llama, second, cache)
        return seq2, logits2

    seq_a, logits_a = two_turns(True)
    seq_b, logits_b = two_turns(False)
    assert torch.equal(seq_a, seq_b)
    torch.testing.assert_close(logits_a, logits_b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("drafting", ["prompt_lookup", "assistant"])
def test_assisted_generation_and_prompt_lookup_are_exact_at_full_budget(tiny_llama, drafting):
    # a repetitive prompt so that prompt lookup finds candidates (and accepts all of them at times: crop(-0))
    ids = torch.arange(3, 23).repeat(4)[None]
    kw = ({"prompt_lookup_num_tokens": 3} if drafting == "prompt_lookup"
          else {"assistant_model": make_tiny_llama(seed=5)})
    ref, _ = _gen(tiny_llama, ids, new=12)
    with torch.no_grad(), kvpolicy.compress(tiny_llama, "full") as cache:
        seq, _ = _gen(tiny_llama, ids, cache, new=12, **kw)
    assert torch.equal(seq, ref)
    layer = cache.layers[0]
    assert layer.n_seen == seq.shape[1] - 1 and layer.physical_length == layer.n_seen  # rejected drafts cropped
    assert int(cache.seen_valid[0]) == layer.n_seen


def test_assisted_generation_with_a_compressing_policy_is_refused_up_front(tiny_llama):
    ids = torch.arange(3, 23).repeat(4)[None]
    with kvpolicy.compress(tiny_llama, "snapkv", budget=0.5) as cache:
        with pytest.raises(CacheUsageError, match=r"generate\(prompt_lookup_num_tokens=\.\.\.\) drafts tokens.*"
                                                  r"policy 'snapkv' compresses.*Allowed:.*budget 1\.0"):
            _gen(tiny_llama, ids, cache, prompt_lookup_num_tokens=3)
        assert cache.layers[0].keys is None  # nothing ran
    assert "generate" not in tiny_llama.__dict__  # the model is restored


def test_crop_of_zero_is_a_no_op_and_compressed_entries_cannot_be_cropped(tiny_llama):
    ids = torch.randint(3, 100, (1, 40), generator=torch.Generator().manual_seed(6))
    policy = kvpolicy.load_policy("streaming", budget={"tokens": 10, "sink": 4})  # keeps 0-3 and 34-39
    with torch.no_grad(), kvpolicy.compress(tiny_llama, policy) as cache:
        tiny_llama(input_ids=ids, cache=cache)
        tiny_llama(input_ids=ids[:, :1], cache=cache)
        assert cache.layers[0].physical_length == 11
        cache.crop(-0)
        cache.crop(0)
        assert cache.layers[0].physical_length == 11
        cache.crop(-1)  # the decoded token: appended after the compression
        assert (cache.layers[0].physical_length, cache.get_seq_length()) == (10, 40)
        cache.crop(38)  # the older form: keep the first 38 tokens seen (34-37 of the recent window stay)
        assert cache.layers[0].positions[0, 0].tolist() == [0, 1, 2, 3, 34, 35, 36, 37]
        with pytest.raises(CacheUsageError, match="cannot remove the last 6 tokens: some of them were compressed"):
            cache.crop(-6)
        assert cache.layers[0].physical_length == 8 and cache.get_seq_length() == 38
        assert int(cache.seen_valid[0]) == 38


def test_a_modality_override_of_the_wrong_shape_is_refused(tiny_llama):
    ids = torch.randint(3, 100, (1, 20))
    with torch.no_grad(), kvpolicy.compress(tiny_llama, "lookm-pivot", budget=0.5) as cache:
        cache.modality = torch.zeros(1, 19, dtype=torch.bool)
        with pytest.raises(CacheUsageError, match=r"cache.modality is \[1, 19\] but the next forward has 1 rows of "
                                                  r"20 tokens; allowed: a bool tensor \[B=1, L=20\]"):
            tiny_llama(input_ids=ids, cache=cache)
        assert cache.modality is None and cache.layers[0].keys is None  # consumed, nothing appended
        mask = torch.zeros(1, 20, dtype=torch.bool)
        mask[:, 5:15] = True
        cache.modality = mask
        tiny_llama(input_ids=ids, cache=cache)
    assert cache.layers[0].image_seen == 10


def test_a_cache_used_by_a_second_model_is_refused_and_left_unchanged(tiny_llama):
    other = make_tiny_llama(seed=9)
    ids = torch.randint(3, 100, (1, 30))
    with torch.no_grad(), kvpolicy.compress(tiny_llama, "snapkv", budget=0.5) as cache:
        tiny_llama(input_ids=ids, cache=cache)
        before = [(layer.keys.clone(), layer.n_seen) for layer in cache.layers]
        with pytest.raises(CacheUsageError, match="updated by a forward that kvpolicy.compress\\(\\) did not see"):
            other(input_ids=ids[:, :1], past_key_values=cache)
        for (keys, n), layer in zip(before, cache.layers):
            assert torch.equal(keys, layer.keys) and n == layer.n_seen
        tiny_llama(input_ids=ids[:, :1], cache=cache)  # the right model still works
    assert cache.layers[0].n_seen == 31


def test_multi_head_latent_attention_is_refused_up_front():
    from transformers import DeepseekV3Config

    cfg = DeepseekV3Config(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                           num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, kv_lora_rank=8,
                           q_lora_rank=None, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8,
                           n_routed_experts=2, num_experts_per_tok=1, first_k_dense_replace=1)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with pytest.raises(UnsupportedModelError, match=r"multi-head latent attention \(kv_lora_rank=8\).*allowed: "
                                                    r"models whose attention caches per-head keys and values"):
        with kvpolicy.compress(model, "snapkv"):
            pass


def test_an_attention_argument_the_kvpolicy_attention_does_not_implement_is_refused_by_name(tiny_llama):
    """Soft-capping, sinks, windows...: the attention function refuses what it would otherwise drop silently."""
    from kvpolicy.integrate import kvpolicy_attention

    attn = tiny_llama.model.layers[0].self_attn
    q = torch.randn(1, 4, 3, 16)
    kv = torch.randn(1, 2, 3, 16)
    with kvpolicy.compress(tiny_llama, "snapkv"):
        for kw, shown in (({"softcap": 50.0}, "softcap=50.0"), ({"s_aux": torch.zeros(4)}, "s_aux=<tensor [4]>"),
                          ({"sliding_window": 512}, "sliding_window=512"), ({"dropout": 0.1}, "dropout=0.1")):
            with pytest.raises(UnsupportedModelError, match=rf"LlamaAttention \(layer 0\) calls its attention with "
                                                            rf"{re.escape(shown)}, which the kvpolicy attention"):
                kvpolicy_attention(attn, q, kv, kv, None, scaling=0.25, **kw)


def test_budgets_follow_a_changed_policy_and_bool_scores_are_accepted():
    from kvpolicy import contract
    from kvpolicy.policy import Budget
    from kvpolicy_baselines.scorers import KeyNorm

    policy = kvpolicy.load_policy({"scorer": "snapkv", "budget": {"ratio": 0.5}})
    assert int(policy.layer_budget(0, 4, torch.tensor([100])).total) == 50
    policy.budget = Budget(ratio=0.25)  # the memo of layer budgets is keyed by the budget and the schedule
    assert int(policy.layer_budget(0, 4, torch.tensor([100])).total) == 25
    ctx = kvpolicy.testing.make_context(policy, kvpolicy.testing.Case(
        batch=1, kv_heads=1, group=1, seq=6, head_dim=4, dtype=torch.float32, pads=(0,), pattern="random",
        image_share=0.0, budget={"tokens": 3}, layer_idx=0, n_layers=1, seed=0), kvpolicy.testing.make_inputs(
        kvpolicy.testing.Case(batch=1, kv_heads=1, group=1, seq=6, head_dim=4, dtype=torch.float32, pads=(0,),
                              pattern="random", image_share=0.0, budget={"tokens": 3}, layer_idx=0, n_layers=1,
                              seed=0)))
    for dtype in (torch.bool, torch.uint8, torch.int64):
        out = contract.check_scores(KeyNorm(), ctx, torch.ones(1, 1, 6, dtype=dtype))
        assert out.dtype == torch.float32


def test_a_refused_crop_changes_no_layer(tiny_llama):
    """A layer that compacted while decoding cannot be cropped: the check covers every layer before any
    changes (layer 0 alone used to be checked first)."""
    ids = torch.randint(3, 100, (1, 40), generator=torch.Generator().manual_seed(8))
    with torch.no_grad(), kvpolicy.compress(tiny_llama, "streaming", budget={"tokens": 10, "sink": 4}) as cache:
        tiny_llama(input_ids=ids, cache=cache)
        tiny_llama(input_ids=ids[:, :1], cache=cache)
        last = cache.layers[1]
        last.positions = last.positions.clone()
        last.positions[..., -2] = 3  # as if this layer had compacted its newest entries
        before = [layer.physical_length for layer in cache.layers]
        with pytest.raises(CacheUsageError, match="layer 1: cannot remove the last 2 tokens"):
            cache.crop(-2)
        assert [layer.physical_length for layer in cache.layers] == before


def test_layer_validity_is_remembered_only_for_the_tensor_it_was_found_for():
    from kvpolicy.cache import ForwardInfo, KVPolicyLayer

    layer = KVPolicyLayer(0)
    kv = torch.randn(2, 3, 5, 4)
    layer.append(kv, kv, ForwardInfo(q_len=5, valid=torch.ones(2, 5, dtype=torch.bool), all_valid=True))
    assert layer.all_valid() and layer.attention_mask(1, None) is None
    one = torch.randn(2, 3, 1, 4)
    layer.append(one, one, ForwardInfo(q_len=1, all_valid=True))
    assert layer.all_valid()  # carried by the append, no read of the validity
    v = layer.valid.clone()
    v[1, :, 0] = False  # a slot made invalid by assigning validity (as a compression or padding does)
    layer.valid = v
    assert not layer.all_valid()
    mask = layer.attention_mask(1, None)
    assert mask is not None and bool(torch.isinf(mask[1, ..., 0]).all()) and bool((mask[0] == 0).all())
    layer.append(one, one, ForwardInfo(q_len=1, all_valid=True))
    assert not layer.all_valid()  # appending valid slots does not make the old invalid one valid
    assert layer.attention_mask(1, None) is not None
    pads = torch.tensor([[True], [False]])
    layer2 = KVPolicyLayer(0)
    layer2.append(kv, kv, ForwardInfo(q_len=5, all_valid=True))
    layer2.append(one, one, ForwardInfo(q_len=1, valid=pads, all_valid=False))
    assert not layer2.all_valid() and layer2.attention_mask(1, None) is not None


@pytest.mark.parametrize("preset", ["full", "snapkv", "h2o", "kvmerger"])  # h2o: an accumulator; kvmerger: bias
def test_in_place_decode_appends_match_the_checked_path(preset, monkeypatch):
    from kvpolicy.cache import KVPolicyLayer

    model = make_tiny_llama()
    ids = torch.randint(1, 128, (1, 40))
    policy = kvpolicy.load_policy(preset) if preset == "full" else kvpolicy.load_policy(preset, budget=0.5)
    taken = []
    fast = KVPolicyLayer._append_in_place

    def spy(self, *a, **k):  # noqa: ANN001, ANN002, ANN003
        taken.append(fast(self, *a, **k))
        return taken[-1]

    def run():
        with torch.inference_mode(), kvpolicy.compress(model, policy) as cache:
            out = model.generate(ids, cache=cache, max_new_tokens=80, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True)  # 80 steps: past the first buffer's spare room
            state = [(layer.keys.clone(), layer.values.clone(), layer.positions.clone(), layer.valid.clone())
                     for layer in cache.layers]
        return out.sequences, torch.stack(out.scores), state

    monkeypatch.setattr(KVPolicyLayer, "_append_in_place", spy)
    seq_fast, scores_fast, state_fast = run()
    assert sum(taken) >= 2 * 70  # the fast path served most steps of both layers
    monkeypatch.setattr(KVPolicyLayer, "_append_in_place", lambda self, *a, **k: False)
    seq, scores, state = run()
    assert torch.equal(seq_fast, seq) and torch.equal(scores_fast, scores)
    for a, b in zip(state_fast, state):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
