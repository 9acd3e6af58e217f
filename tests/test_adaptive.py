"""Adaptive budgets (``adaptive`` selector, AdaKV / KVzip allocation) and ragged layers that hold only
what is kept."""

from __future__ import annotations

import pytest
import torch

import kvpolicy
from kvpolicy.allocate import allocate
from kvpolicy.bench.runner import restore, snapshot
from kvpolicy.errors import ConfigError
from kvpolicy.testing import check_component, check_preset

from conftest import make_tiny_llama


# --------------------------------------------------------------------------------------------- allocate()
def _reference_counts(scores, valid, total, floor):
    """Greedy by hand: floors first (each group's best), then the best remaining entries of any group;
    ties to the lower group, then to the better rank within the group."""
    b, g, s = scores.shape
    out = torch.zeros(b, g, dtype=torch.long)
    for r in range(b):
        ranked = []  # (group, rank, score) of valid entries, each group in descending score order
        for j in range(g):
            vals = sorted([float(scores[r, j, i]) for i in range(s) if valid[r, j, i]], reverse=True)
            ranked += [(j, k, v) for k, v in enumerate(vals)]
        left = min(int(total[r]), len(ranked))
        chosen = {(j, k) for j, k, _ in ranked if k < min(int(floor[r, j]), int(valid[r, j].sum()))}
        rest = sorted((x for x in ranked if (x[0], x[1]) not in chosen), key=lambda x: (-x[2], x[0], x[1]))
        chosen |= {(j, k) for j, k, _ in rest[:left - len(chosen)]}
        for j, _ in chosen:
            out[r, j] += 1
    return out


@pytest.mark.parametrize("seed", range(6))
def test_allocate_equals_a_greedy_reference(seed):
    gen = torch.Generator().manual_seed(seed)
    b, g, s = 3, 4, 9
    scores = torch.randint(0, 5, (b, g, s), generator=gen).float()  # many ties
    valid = torch.rand(b, g, s, generator=gen) > 0.2
    total = torch.tensor([5, 12, 40])
    floor = torch.tensor([[1, 1, 1, 1], [2, 0, 3, 1], [9, 9, 9, 9]])
    floor = torch.minimum(floor, (total // g)[:, None].expand(b, g))
    counts = allocate(scores, valid, total, floor)
    assert torch.equal(counts, _reference_counts(scores, valid, total, floor))
    assert torch.equal(counts.sum(-1), torch.minimum(total, valid.sum((1, 2))))
    assert bool((counts >= torch.minimum(floor, valid.sum(-1))).all())


def test_allocate_refuses_floors_above_the_total():
    with pytest.raises(ValueError, match="floors"):
        allocate(torch.rand(1, 2, 4), torch.ones(1, 2, 4, dtype=torch.bool), torch.tensor([3]), torch.tensor([[2, 2]]))


# --------------------------------------------------------------------------------------------- invariants
def test_adaptive_selector_keeps_the_kit_promises():
    check_component("selector", "adaptive", {"scope": "heads", "floor": 0.3})


@pytest.mark.parametrize("preset", ["adakv-snapkv", "snapkv-global", "h2o-global", "lookm-pivot-adakv"])
def test_adaptive_presets_keep_the_kit_promises(preset):
    check_preset(preset)


def test_scores_that_are_not_comparable_are_refused_when_the_policy_is_built():
    with pytest.raises(ConfigError, match=r"scorer 'knorm' does not give scores on one scale.*allowed scorers: .*snapkv"):
        kvpolicy.load_policy({"name": "x", "budget": 0.2, "scorer": "knorm", "selector": "adaptive"})


def test_pooling_layers_with_a_compacting_decode_rule_is_refused():
    with pytest.raises(ConfigError, match=r"pools every layer.*allowed: decode 'none'"):
        kvpolicy.load_policy("h2o-global", decode={"name": "rolling"})


# --------------------------------------------------------------------------------------------- the cache
def _prompt(batch_pad: int = 7, n: int = 150):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 120, (2, n), generator=gen)
    mask = torch.ones_like(ids)
    ids[1, :batch_pad], mask[1, :batch_pad] = 0, 0
    return ids, mask


def _generate(model, preset, ids, mask, *, ragged=True, budget=0.4, new=6, extra=None):
    """Greedy generate, then (optionally) a multi-token forward on the same cache; returns step logits."""
    with torch.inference_mode(), kvpolicy.compress(model, preset, budget=budget) as cache:
        cache.ragged = ragged
        out = model.generate(input_ids=ids, attention_mask=mask, cache=cache, max_new_tokens=new, do_sample=False,
                             output_scores=True, return_dict_in_generate=True, pad_token_id=0)
        logits = torch.stack(out.scores, 1)
        if extra is not None:
            full = torch.cat([mask, torch.ones(mask.shape[0], new - 1 + extra.shape[1], dtype=mask.dtype)], 1)
            second = model(input_ids=torch.cat([out.sequences[:, -1:], extra], 1), attention_mask=full, cache=cache)
            logits = torch.cat([logits, second.logits], 1)
    return out.sequences, logits, cache


@pytest.mark.parametrize("preset", ["adakv-snapkv", "snapkv-global", "lookm-pivot-adakv"])
def test_ragged_heads_attend_exactly_like_the_dense_masked_layout(preset):
    """Prefill, decode, a second multi-token forward, batch 2 with left padding, GQA (6 query / 3 KV heads):
    heads stored apart give the logits of the same selection padded to the longest head and masked."""
    model = make_tiny_llama(layers=3, heads=6, kv_heads=3, hidden=96)
    ids, mask = _prompt()
    extra = torch.randint(3, 120, (2, 5), generator=torch.Generator().manual_seed(2))
    seq_r, log_r, ragged = _generate(model, preset, ids, mask, extra=extra)
    seq_d, log_d, dense = _generate(model, preset, ids, mask, ragged=False, extra=extra)
    assert any(layer.heads is not None for layer in ragged.layers)
    assert all(layer.heads is None for layer in dense.layers)
    assert torch.equal(seq_r, seq_d)
    torch.testing.assert_close(log_r, log_d, rtol=1e-5, atol=1e-5)
    assert ragged.report().bytes_now < dense.report().bytes_now


def test_a_ragged_layer_holds_exactly_its_entries():
    model = make_tiny_llama(layers=2, heads=4, kv_heads=2, hidden=64)
    ids = torch.randint(3, 120, (1, 200), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode(), kvpolicy.compress(model, "adakv-snapkv", budget=0.3) as cache:
        model(input_ids=ids, cache=cache)
    for layer in cache.layers:
        assert layer.heads is not None
        lengths = [h.physical_length for h in layer.heads]
        assert len(set(lengths)) > 1 and sum(lengths) == 2 * 60  # the layer's 2 x 60 entries, split unevenly
        assert all(bool(h.valid.all()) for h in layer.heads)
        d, esize = layer.dims()[2:]
        assert cache.report().layers[layer.layer_idx].bytes_now == sum(lengths) * d * esize * 2
        assert min(lengths) >= int(60 * 0.2)  # the floor


def test_pooled_layers_keep_the_sum_of_the_budgets_with_floors_and_stage_cap():
    model = make_tiny_llama(layers=4, heads=4, kv_heads=2, hidden=64)
    ids = torch.randint(3, 120, (1, 200), generator=torch.Generator().manual_seed(4))
    policy = kvpolicy.load_policy("snapkv-global", budget=0.25)
    with torch.inference_mode(), kvpolicy.compress(model, policy) as cache:
        model(input_ids=ids, cache=cache)
    counts = torch.tensor([[int(layer.valid[0, h].sum()) for h in range(2)] for layer in cache.layers])
    assert int(counts.sum()) == 4 * 2 * 50
    assert int(counts.min()) >= 10 and int(counts.max()) <= 150  # floor 0.2 x 50, stage cap 3 x 50
    assert len(set(counts.sum(1).tolist())) > 1  # layers keep different totals
    assert [e.event for e in cache.layers[0].events] == ["compress", "pool"]


def test_a_batch_row_keeps_what_it_keeps_alone():
    model = make_tiny_llama(layers=3, heads=6, kv_heads=3, hidden=96)
    ids, mask = _prompt()
    for preset in ("adakv-snapkv", "snapkv-global"):
        with torch.inference_mode(), kvpolicy.compress(model, preset, budget=0.4) as alone:
            model(input_ids=ids[1:, 7:], cache=alone)
        with torch.inference_mode(), kvpolicy.compress(model, preset, budget=0.4) as batch:
            model(input_ids=ids, attention_mask=mask, cache=batch)
        for la, lb in zip(alone.layers, batch.layers):
            for h in range(3):
                a = la.positions[0, h][la.valid[0, h]]
                b = lb.positions[1, h][lb.valid[1, h]]
                assert torch.equal(torch.sort(b).values, torch.sort(a).values + 7), (preset, la.layer_idx, h)


def test_bench_snapshot_restores_ragged_layers():
    model = make_tiny_llama(layers=2, heads=4, kv_heads=2, hidden=64)
    ids = torch.randint(3, 120, (1, 120), generator=torch.Generator().manual_seed(5))
    nxt = torch.randint(3, 120, (1, 4), generator=torch.Generator().manual_seed(6))
    with torch.inference_mode(), kvpolicy.compress(model, "adakv-snapkv", budget=0.4) as cache:
        model(input_ids=ids, cache=cache)
        snap = snapshot(cache)
        first = [model(input_ids=nxt[:, i:i + 1], cache=cache).logits for i in range(4)]
        restore(cache, snap)
        assert cache.layers[0].heads is not None and cache.layers[0].n_seen == 120
        again = [model(input_ids=nxt[:, i:i + 1], cache=cache).logits for i in range(4)]
    for a, b in zip(first, again):
        assert torch.equal(a, b)


def test_crop_and_rolling_decode_on_ragged_layers():
    """Tokens appended after the compression can be removed head by head; a rolling decode rule reallocates
    over the heads and keeps the layer ragged."""
    model = make_tiny_llama(layers=2, heads=4, kv_heads=2, hidden=64)
    ids = torch.randint(3, 120, (1, 200), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode(), kvpolicy.compress(model, "adakv-snapkv", budget=0.3) as cache:
        model(input_ids=ids, cache=cache)
        before = [h.physical_length for h in cache.layers[0].heads]
        for i in range(3):  # decode steps (a multi-token forward would be compressed again)
            model(input_ids=ids[:, i:i + 1], cache=cache)
        assert [h.physical_length for h in cache.layers[0].heads] == [n + 3 for n in before]
        cache.crop(-3)
        assert [h.physical_length for h in cache.layers[0].heads] == before and cache.get_seq_length() == 200
    policy = kvpolicy.load_policy("adakv-snapkv", budget={"tokens": 40, "sink": 0},
                                  decode={"name": "rolling", "every": 8, "query_window": 32})
    with torch.inference_mode(), kvpolicy.compress(model, policy) as cache:
        out = model.generate(input_ids=ids, cache=cache, max_new_tokens=20, do_sample=False, pad_token_id=0)
    assert out.shape[1] == 220
    layer = cache.layers[0]
    assert any(e.phase == "decode" for e in layer.events)
    assert int(layer.valid.sum()) <= 2 * (40 + 8)


@pytest.mark.slow
def test_adaptive_presets_on_smollm2_hold_only_what_they_keep(smollm2, smol_passage):
    model, tok = smollm2
    n = smol_passage.shape[1]
    for preset, kw in (("adakv-snapkv", {}), ("kvzip", {"tokenizer": tok})):
        with torch.no_grad(), kvpolicy.compress(model, preset, budget=0.2, **kw) as cache:
            out = model.generate(input_ids=smol_passage, cache=cache, max_new_tokens=4, do_sample=False,
                                 pad_token_id=0)
        assert tok.decode(out[0, n:]).strip()
        rep = cache.report()
        entries = sum(int(layer.valid.sum()) for layer in cache.layers)
        heads = cache.layers[0].dims()[1]
        assert entries == len(cache.layers) * heads * (int(n * 0.2) + 3)  # the pool's total, then 3 appended
        assert rep.bytes_now / rep.bytes_full <= (int(n * 0.2) + 3) / (n + 3) + 1e-9  # bytes held = entries
        if preset == "kvzip":  # one top-k over every layer: layers keep different totals
            totals = {int(layer.valid.sum()) for layer in cache.layers}
            assert len(totals) > 1


def test_pooled_layers_are_traced_as_compress_then_pool_spans():
    from kvpolicy import telemetry_setup

    tel = telemetry_setup.in_memory()
    try:
        model = make_tiny_llama(layers=3, heads=4, kv_heads=2, hidden=64)
        ids = torch.randint(3, 120, (1, 200), generator=torch.Generator().manual_seed(8))
        with torch.inference_mode(), kvpolicy.compress(model, "snapkv-global", budget=0.25) as cache:
            model(input_ids=ids, cache=cache)
        spans = [s for s in tel.finished_spans() if s.name == "kvpolicy.compress"]
    finally:
        tel.shutdown()
    events = [(s.attributes["kvpolicy.layer"], s.attributes["kvpolicy.event"]) for s in spans]
    assert events == [(i, "compress") for i in range(3)] + [(i, "pool") for i in range(3)]
    kept = [s.attributes["kvpolicy.tokens_kept"] for s in spans if s.attributes["kvpolicy.event"] == "pool"]
    assert kept == [int(layer.valid.sum()) // 2 for layer in cache.layers] and sum(kept) == 3 * 50
