"""Elastic Cache plugin: golden examples, hand-checked merges, fixed-point decoding through the cache."""

from __future__ import annotations

import pytest
import torch

import kvpolicy
from kvpolicy.policy import CompressionContext, DecodeView, LayerBudget
from kvpolicy_elastic import ElasticAnchors, ElasticBucket, FixedPoint

from conftest import make_tiny_llama

GOLDEN_SCORES = [0.0, 0.9, 3.0, 0.1, 0.2, 2.5, 0.3, 0.4, 1.0, 0.0]  # positions 0 and 9 are not candidates


def _ctx(values: torch.Tensor, valid: torch.Tensor, ratio: float, sink: int = 1) -> CompressionContext:
    """A prefill context with keys = values ``[B, H, S, D]`` and a ratio budget."""
    b, h, s, _ = values.shape
    seen = valid.sum(-1).long()
    total = (seen.double() * ratio).floor().long()
    budget = LayerBudget(total=total, sink=sink, recent=torch.zeros(b, dtype=torch.long), ratio=ratio, seen=seen)
    v3 = valid[:, None, :].expand(b, h, s)
    return CompressionContext(layer_idx=0, n_layers=1, phase="prefill", keys=values.clone(), values=values.clone(),
                              positions=torch.arange(s).expand(b, h, s), valid=v3,
                              is_image=torch.zeros(b, h, s, dtype=torch.bool), budget=budget, scaling=1.0)


def _compress(ctx: CompressionContext, scores: list[list[float]], compat: bool = False):
    sc = torch.tensor(scores, dtype=torch.float32)[:, None, :]
    sel = ElasticAnchors(compat=compat).select(ctx, sc, None)
    merged = ElasticBucket().merge(ctx, sel, sc)
    return sel, merged


def test_golden_prefill_and_decode():
    ctx = _ctx(torch.arange(10.0).view(1, 1, 10, 1), torch.ones(1, 10, dtype=torch.bool), ratio=0.5)
    sel, merged = _compress(ctx, [GOLDEN_SCORES])
    assert sel.indices.tolist() == [[[0, 2, 5, 8, 9]]]  # anchors {2, 5, 8} at their own slots
    assert merged.keys.flatten().tolist() == [0.0, 2.0, 5.0, 7.5, 9.0]
    assert merged.values.flatten().tolist() == [0.0, 2.0, 5.0, 7.5, 9.0]
    assert merged.merged == 5

    # decode: distance -2 -> p* = 5 - 2 = 3; the rule runs before each append, on the state after the last one
    rule = FixedPoint(distance=-2)
    state = dict(ctx.state)
    budget = LayerBudget(total=torch.tensor([5]), sink=1, recent=torch.tensor([0]), ratio=0.5, seen=torch.tensor([10]))
    cache = merged.values.flatten().tolist()
    rule.on_prefill(DecodeView(0, 1, n_seen=10, length=5, target=5, state=state, budget=budget))
    assert state["fixed_point"].tolist() == [3]
    after = {}
    for new in (10, 11, 12, 13, 14):
        n_seen = new  # tokens seen before this forward
        action = rule.on_decode(DecodeView(0, 1, n_seen=n_seen, length=len(cache), target=0, state=state,
                                           budget=budget))
        if action is not None:
            assert action.event == "fixed-point"
            cache = [cache[i] for i in action.indices.flatten().tolist()]
        after[new - 1] = list(cache)  # the state the reference code has right after appending `new - 1`
        cache.append(float(new))
    assert after[10] == [0, 2, 5, 7.5, 9, 10]
    assert after[11] == [0, 2, 5, 9, 10, 11]
    assert after[12] == [0, 2, 5, 9, 10, 11, 12]
    assert after[13] == [0, 2, 5, 10, 11, 12, 13]


def test_golden_mass_and_value_only_forms():
    """Issue 12: ``mass`` adds ``+log n`` (n = tokens an anchor stands for) to the faithful bucket mean;
    ``keys: keep`` averages values only. Buckets of the golden example: {1, 2, 3}, {4, 5, 6}, {7, 8}."""
    ctx = _ctx(torch.arange(10.0).view(1, 1, 10, 1), torch.ones(1, 10, dtype=torch.bool), ratio=0.5)
    sc = torch.tensor([GOLDEN_SCORES])[:, None, :]
    sel = ElasticAnchors().select(ctx, sc, None)
    mass = ElasticBucket(mass=True).merge(ctx, sel, sc)
    assert mass.keys.flatten().tolist() == mass.values.flatten().tolist() == [0.0, 2.0, 5.0, 7.5, 9.0]
    assert mass.multiplicity.flatten().tolist() == [1.0, 3.0, 3.0, 2.0, 1.0] and mass.merged == 5
    torch.testing.assert_close(mass.bias.flatten(), torch.tensor([1.0, 3, 3, 2, 1]).log())
    vonly = ElasticBucket(keys="keep", mass=True).merge(ctx, sel, sc)
    assert vonly.keys.flatten().tolist() == [0.0, 2.0, 5.0, 8.0, 9.0]  # the anchors' own keys
    assert vonly.values.flatten().tolist() == [0.0, 2.0, 5.0, 7.5, 9.0]
    assert ElasticBucket().merge(ctx, sel, sc).bias is None  # the paper's form: no bias
    # entries that already stand for several tokens (a second prompt on the same cache) weigh accordingly
    ctx.multiplicity = torch.tensor([[[1.0, 1, 1, 3, 1, 1, 1, 1, 1, 1]]])
    again = ElasticBucket(mass=True).merge(ctx, sel, sc)
    assert again.values[0, 0, 1, 0].item() == pytest.approx((1 + 2 + 3 * 3) / 5) and again.multiplicity[0, 0, 1] == 5


def test_mass_keeps_attention_exact_for_a_bucket_of_duplicates():
    """With ``mass``, a bucket of identical keys and values weighs as all its tokens in the softmax."""
    from kvpolicy.integrate import sdpa

    g = torch.Generator().manual_seed(2)
    k, v = torch.randn(1, 1, 4, 8, generator=g), torch.randn(1, 1, 4, 8, generator=g)
    order = [0, 1, 1, 1, 2, 2, 2, 3]  # buckets {1, 2, 3} and {4, 5, 6} (4 -> 5: nearer than 2) hold duplicates
    keys, values = k[:, :, order], v[:, :, order]
    ctx = _ctx(values, torch.ones(1, 8, dtype=torch.bool), ratio=0.5)
    ctx.keys = keys
    sc = torch.tensor([[0.0, 0.1, 5.0, 0.2, 0.0, 4.0, 0.3, 0.0]])[:, None, :]  # anchors 2 and 5, F = 4 -> 4 kept
    sel = ElasticAnchors().select(ctx, sc, None)
    assert sel.indices.tolist() == [[[0, 2, 5, 7]]]
    q = torch.randn(1, 2, 1, 8, generator=g)
    full = sdpa(q, keys, values, None, 0.35, causal=False)
    for form, exact in ((ElasticBucket(mass=True), True), (ElasticBucket(keys="keep", mass=True), True),
                        (ElasticBucket(), False)):
        m = form.merge(ctx, sel, sc)
        out = sdpa(q, m.keys, m.values, None if m.bias is None else m.bias[:, :, None, :], 0.35, causal=False)
        assert torch.allclose(out, full, atol=1e-5) == exact


def test_golden_compat_mode_rank_bug_and_off_by_one():
    # argsort of the candidate scores is [2, 3, 5, 6, 0, 7, 4, 1]; entries > F = 5 sit at candidate
    # indices 3 and 5, i.e. positions 4 and 6 (importance 0.2 and 0.3); 4 entries are kept
    ctx = _ctx(torch.arange(10.0).view(1, 1, 10, 1), torch.ones(1, 10, dtype=torch.bool), ratio=0.5)
    sel, merged = _compress(ctx, [GOLDEN_SCORES], compat=True)
    assert sel.indices.tolist() == [[[0, 4, 6, 9]]]
    # 1, 2, 3 and 5 (tie between 4 and 6 -> earlier) go to 4: (4+1+2+3+5)/5 = 3; 7, 8 go to 6: (6+7+8)/3 = 7
    assert merged.keys.flatten().tolist() == [0.0, 3.0, 7.0, 9.0]
    # p* still counts from the nominal T - F = 5
    state = dict(ctx.state)
    FixedPoint(distance=-2).on_prefill(DecodeView(0, 1, n_seen=10, length=4, target=5, state=state,
                                                  budget=ctx.budget))
    assert state["fixed_point"].tolist() == [3]


def test_gqa_two_heads_merge_per_head_with_shared_anchors():
    # T = 8, gamma = 0.5: F = 4, 4 entries: sink 0, last 7 and 2 anchors among candidates 1..6
    vals = torch.zeros(1, 2, 8, 2)
    vals[0, 0, :, 0] = torch.arange(8.0)  # head 0, dim 0: position
    vals[0, 0, :, 1] = 1.0
    vals[0, 1, :, 0] = torch.tensor([5.0, 1, 2, 3, 4, 5, 6, 7]) * 10  # head 1: other values, same anchors
    vals[0, 1, :, 1] = torch.arange(8.0) ** 2
    ctx = _ctx(vals, torch.ones(1, 8, dtype=torch.bool), ratio=0.5)
    scores = [[9.0, 0.1, 5.0, 0.2, 0.3, 4.0, 0.4, 9.0]]  # anchors 2 and 5
    sel, merged = _compress(ctx, scores)
    assert sel.indices.tolist() == [[[0, 2, 5, 7]]]
    # owners: 1 -> 2, 3 -> 2 (|3-2| < |3-5|), 4 -> 5, 6 -> 5: buckets {1,2,3}, {4,5,6}
    exp0 = torch.tensor([[0.0, 1], [2, 1], [5, 1], [7, 1]])
    exp1 = torch.tensor([[50.0, 0], [20, (1 + 4 + 9) / 3], [50, (16 + 25 + 36) / 3], [70, 49]])
    torch.testing.assert_close(merged.keys[0, 0], exp0)
    torch.testing.assert_close(merged.values[0, 1], exp1)
    # sinks and the last entry are bit-identical
    assert torch.equal(merged.keys[0, :, [0, 3]], vals[0, :, [0, 7]])


def test_batch_left_padding_pads_never_kept_nor_merged():
    # row 0: the golden row; row 1: 3 pads then 7 tokens valued 100 + t (F = int(7 - 3.5) = 3, 4 entries)
    vals = torch.arange(10.0).repeat(2, 1)
    vals[1, :3] = -1000.0  # pads: would show up in any mean they leaked into
    vals[1, 3:] = 100.0 + torch.arange(7.0)
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[1, :3] = False
    ctx = _ctx(vals.view(2, 1, 10, 1), valid, ratio=0.5)
    # row 1 candidates are valid ranks 1..5 = positions 4..8; scores pick positions 5 and 8 as anchors
    scores = [GOLDEN_SCORES, [7.0, 7.0, 7.0, 0.0, 0.1, 2.0, 0.2, 0.3, 1.0, 0.0]]
    sel, merged = _compress(ctx, scores)
    assert sel.indices[0].tolist() == [[0, 2, 5, 8, 9]]
    assert sel.indices[1, 0, 1:].tolist() == [3, 5, 8, 9] and sel.kept[1].tolist() == [[False, True, True, True, True]]
    # row 1 (value 100 + rank): owners 4 -> 5, 6 -> 5 (|6-5| < |6-8|), 7 -> 8 (|7-8| < |7-5|):
    # sink 100, anchor 5 = (102+101+103)/3, anchor 8 = (105+104)/2, last 106
    assert merged.keys[1, 0, 1:, 0].tolist() == [100.0, 102.0, 104.5, 106.0]
    assert merged.keys[0].flatten().tolist() == [0.0, 2.0, 5.0, 7.5, 9.0]  # rows are independent
    assert merged.merged == 5 + 3
    # kept rows are right-aligned, so p* = nominal end + distance is one physical index for both rows
    state = dict(ctx.state)
    FixedPoint(distance=-2).on_prefill(DecodeView(0, 1, n_seen=10, length=5, target=5, state=state,
                                                  budget=ctx.budget))
    assert state["fixed_point"].tolist() == [3, 3]


def test_short_prompts_and_positive_distance():
    # T = 3, gamma = 0.5: F = int(1.5) = 1 -> unchanged (the code merges only when F > 1)
    ctx = _ctx(torch.arange(3.0).view(1, 1, 3, 1), torch.ones(1, 3, dtype=torch.bool), ratio=0.5)
    sel, merged = _compress(ctx, [[1.0, 2.0, 3.0]])
    assert sel.indices.tolist() == [[[0, 1, 2]]] and merged.merged == 0
    # p* = (3 - 1) - 25 is clamped into [s, len) = [1, 3)
    state = dict(ctx.state)
    FixedPoint().on_prefill(DecodeView(0, 1, n_seen=3, length=3, target=1, state=state, budget=ctx.budget))
    assert state["fixed_point"].tolist() == [1]
    state = {}  # a layer compressed earlier (10 entries for 20 tokens seen, no padding), not compressed now
    seen20 = LayerBudget(total=torch.tensor([10]), sink=1, recent=torch.tensor([0]), ratio=0.5,
                         seen=torch.tensor([20]))
    FixedPoint(distance=7).on_prefill(DecodeView(0, 1, n_seen=20, length=10, target=1, state=state, budget=seen20))
    assert state["fixed_point"].tolist() == [7]


def _elastic_policy(ratio: float, distance: int) -> dict:
    cfg = dict(kvpolicy.load_policy("elastic-cache").to_config())
    cfg["budget"] = {"ratio": ratio, "sink": 1}
    cfg["decode"] = {"name": "fixed-point", "distance": distance}
    return cfg


def test_fixed_point_invariants_through_the_cache():
    model = make_tiny_llama(layers=2, heads=4, kv_heads=2)
    gamma, t = 0.5, 61
    ids = torch.randint(3, 120, (1, t), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), kvpolicy.compress(model, _elastic_policy(gamma, -5)) as cache:
        logits = model(input_ids=ids, cache=cache).logits
        k0 = 61 - int(61 - 61 * gamma)  # 31 entries
        assert [layer.physical_length for layer in cache.layers] == [k0, k0]
        p_star = int(cache.layers[0].state["fixed_point"])
        assert p_star == k0 - 5
        frozen = cache.layers[0].keys[..., :p_star, :].clone()
        deletions = 0
        for _ in range(30):
            before = cache.layers[0].keys.clone()
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            logits = model(input_ids=nxt, cache=cache).logits
            layer = cache.layers[0]
            n_seen = layer.n_seen
            assert abs(layer.physical_length - gamma * n_seen) <= 2
            assert torch.equal(layer.keys[..., :p_star, :], frozen)
            if layer.physical_length == before.shape[-2]:  # one deleted (at p*), one appended
                deletions += 1
                assert torch.equal(layer.keys[..., p_star:-1, :], before[..., p_star + 1:, :])
            assert [e.event for e in layer.events].count("fixed-point") == deletions
    assert deletions == 15  # len tracks ceil(gamma * n_seen): 31 -> 46 entries over 30 appended tokens
    assert cache.layers[0].physical_length == 46 == cache.layers[1].physical_length


def test_second_prompt_on_the_same_cache_recompresses_to_gamma_n_seen():
    model = make_tiny_llama(layers=2, heads=4, kv_heads=2)
    ids = torch.randint(3, 120, (1, 81), generator=torch.Generator().manual_seed(4))
    with torch.no_grad(), kvpolicy.compress(model, _elastic_policy(0.5, -5)) as cache:
        model(input_ids=ids[:, :61], cache=cache)
        assert cache.layers[0].physical_length == 31
        logits = model(input_ids=ids[:, 61:], cache=cache).logits  # a second turn: 31 + 20 entries, 81 seen
        layer = cache.layers[0]
        # 81 - int(81 - 40.5) = 41 entries; sink + last kept, 39 anchors; p* moves to 41 - 5
        assert layer.physical_length == 41 and int(layer.state["fixed_point"]) == 36
        assert layer.events[-1].tokens_merged == 10
        assert bool((layer.positions[0, 0, 1:] > layer.positions[0, 0, :-1]).all())
        for _ in range(6):
            logits = model(input_ids=logits[:, -1].argmax(-1, keepdim=True), cache=cache).logits
            assert abs(layer.physical_length - 0.5 * layer.n_seen) <= 2


def test_batch_generate_left_padded_through_the_cache(tiny_llama):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 120, (2, 40), generator=g)
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, :12] = 0
    ids[1, :12] = 0
    with kvpolicy.compress(tiny_llama, "elastic-cache", budget=0.5) as cache:
        out = tiny_llama.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                                  pad_token_id=0, cache=cache)
    assert out.shape == (2, 52)
    layer = cache.layers[0]
    # row 0: 20 entries after prefill (40 tokens), row 1: 14 (28 tokens); 11 appended, each row's own
    # fixed-point deletions keep it at ceil(0.5 * n_seen): 26 (51 seen) and 20 (39 seen)
    assert layer.physical_length == 26
    assert layer.valid[:, 0].sum(-1).tolist() == [26, 20]
    assert not bool((layer.valid & (layer.positions < 12))[1].any())  # no pad of row 1 is valid


def _teacher_forced(model, policy, prompts: list[torch.Tensor], steps: torch.Tensor):
    """Left-padded prefill of ``prompts``, then ``steps [B, T]`` fed one token per forward; per step and
    layer, each row's valid entries, the physical lengths, the last logits and each row's valid keys."""
    b, width = len(prompts), max(len(p) for p in prompts)
    ids = torch.zeros(b, width, dtype=torch.long)
    mask = torch.zeros(b, width, dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):], mask[r, width - len(p):] = p, 1
    out = []
    with torch.no_grad(), kvpolicy.compress(model, policy) as cache:
        model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0), cache=cache)
        for t in range(steps.shape[1]):
            mask = torch.cat([mask, torch.ones(b, 1, dtype=torch.long)], dim=1)
            logits = model(input_ids=steps[:, t:t + 1], attention_mask=mask, position_ids=mask.sum(-1, keepdim=True) - 1,
                           cache=cache).logits[:, -1]
            out.append({"valid": [layer.valid[:, 0].sum(-1).tolist() for layer in cache.layers],
                        "length": [layer.physical_length for layer in cache.layers], "logits": logits,
                        "keys": [[layer.keys[r][:, layer.valid[r, 0]] for r in range(b)] for layer in cache.layers]})
    return out


@pytest.mark.parametrize("lens", [(41, 30), (43, 41)])
def test_padded_batch_rows_follow_their_own_fixed_point_schedule(lens):
    """Issue 12: each row of a left-padded batch deletes on its own ``int(len_r - n_seen_r * gamma) >= 1``, so
    it holds, after every decode step, exactly the entries (and gives the logits) of the same prompt alone.
    Before, every row deleted on the longest row's schedule: the 30-token row lost its entries at the 41-token
    row's steps (valid counts off by one on 16 of the 24 steps here). gamma * (41 - 30) = 3.3 is not an
    integer, so the rows delete at different steps; 43 and 41 tokens both compress to 13 entries (no filler
    slot in either row), so a row that deletes alone needs a filler slot in front (``KeepIndices.kept``)."""
    model = make_tiny_llama(layers=2, heads=4, kv_heads=2)
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(3, 120, (n,), generator=g) for n in lens]
    steps = torch.randint(3, 120, (2, 24), generator=g)
    policy = _elastic_policy(0.3, -5)
    batch = _teacher_forced(model, policy, prompts, steps)
    alone = [_teacher_forced(model, policy, [prompts[r]], steps[r:r + 1]) for r in range(2)]
    deleted_at = {0: set(), 1: set()}
    for t, got in enumerate(batch):
        for r in range(2):
            ref = alone[r][t]
            assert [v[r] for v in got["valid"]] == [v[0] for v in ref["valid"]], (t, r)
            torch.testing.assert_close(got["logits"][r], ref["logits"][0], atol=1e-4, rtol=1e-4)
            for layer in range(2):
                torch.testing.assert_close(got["keys"][layer][r], ref["keys"][layer][0], atol=1e-5, rtol=1e-5)
            n_seen = lens[r] + t + 1
            assert abs(ref["valid"][0][0] - 0.3 * n_seen) <= 2  # ALGORITHMS.md 6, invariant 18
            if t and ref["valid"][0][0] == alone[r][t - 1]["valid"][0][0]:
                deleted_at[r].add(t)
        assert got["length"] == [max(v) for v in got["valid"]]  # no filler slot beyond the longest row
    assert deleted_at[0] != deleted_at[1] and deleted_at[0] and deleted_at[1]


@pytest.mark.parametrize("preset", ["elastic-cache"])
def test_preset_generates_on_smollm2(smollm2, smol_passage, preset):
    model, tok = smollm2
    t = smol_passage.shape[1]
    with kvpolicy.compress(model, preset, budget=0.2) as cache:
        out = model.generate(input_ids=smol_passage, max_new_tokens=32, do_sample=False, cache=cache,
                             pad_token_id=tok.eos_token_id)
    assert out.shape[1] == t + 32
    rep = cache.report()
    assert t == 1500
    # prefill: 1500 - int(1500 - 300) = 300 entries; 31 appended tokens; len tracks ceil(0.2 * 1531) = 307
    assert [r.entries for r in rep.layers] == [307] * 30
    assert all(r.tokens_merged == 1500 - 300 for r in rep.layers)
    text = tok.decode(out[0, t:], skip_special_tokens=True)
    assert len(text.strip()) > 0


@pytest.mark.parametrize(("preset", "model"), [("elastic-cache", True), ("elastic-cache-compat", False),
                                               ("elastic-cache-mass", False), ("elastic-cache-vonly", True)])
def test_presets_keep_the_invariants(preset, model):
    """kvpolicy.testing: shapes, pads, order, determinism, batch independence, GQA = MHA, budget >= length is
    the identity; the bucket merge is convex and the identity on equal vectors."""
    from kvpolicy.testing import check_preset

    check_preset(preset, model=model)
