"""Each eviction baseline at budget 0.2 on SmolLM2 with ~1500 tokens of real text.

The kept positions are checked against an independent reference computed here from the eager attention
probabilities, and the next-token logits against a cache gathered by hand.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

import kvpolicy
from kvpolicy.compat import cache_kwargs  # a plain DynamicCache: the model's own keyword

RATIO = 0.2


@pytest.fixture(scope="module")
def reference(smollm2, smol_passage):
    """Eager run of the prompt: per-layer attention statistics and the full KV cache."""
    model, _ = smollm2
    stats: list[dict[str, torch.Tensor]] = []

    def hook(_mod, _inp, out):
        probs = out[1][0].float()  # [H, L, L]
        L = probs.shape[1]
        stats.append({"colsum": probs.sum(1), "last32": probs[:, -32:].sum(1), "last": probs[:, -1],
                      "stride8": strided_estimate(probs, 8)})

    handles = [layer.self_attn.register_forward_hook(hook) for layer in model.model.layers]
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            cache = DynamicCache()
            model(input_ids=smol_passage, output_attentions=True, **cache_kwargs(model, cache))
    finally:
        model.set_attn_implementation("sdpa")
        for h in handles:
            h.remove()
    return stats, cache


def strided_estimate(probs: torch.Tensor, stride: int, tail: int = 32, band: int = 64) -> torch.Tensor:
    """H2O's column sums ``[H, L]`` as the strided estimate computes them with the prefill kernel's log-sum-exp:
    every query's attention to the ``band`` entries before it exact; the farther pairs from the last ``tail``
    queries and every ``stride``-th one before them, each key's far sum scaled by (queries at least ``band``
    after it) / (sampled ones)."""
    L = probs.shape[1]
    i, j = torch.arange(L)[:, None], torch.arange(L)[None]
    near = probs.masked_fill(j <= i - band, 0.0).sum(1)
    t = min(L, tail)
    pick = torch.tensor(list(range(L - t - 1, -1, -stride))[::-1] + list(range(L - t, L)))
    far = probs[:, pick].masked_fill(j > pick[:, None] - band, 0.0).sum(1)
    keys = torch.arange(L)
    every = (L - (keys + band)).clamp_min(0).float()
    sampled = (pick[:, None] >= keys[None] + band).sum(0).float().clamp_min(1)
    return near + far * every / sampled


def _group_mean(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    return x.view(kv_heads, -1, x.shape[-1]).mean(1)


def _top(scores: torch.Tensor, forced: torch.Tensor, k: int) -> torch.Tensor:
    """Reference top-k per row (numpy lexsort): forced first, then score desc, then lower position."""
    pos = np.arange(scores.shape[1])
    out = []
    for row in scores.double().numpy():
        order = np.lexsort((pos, -row, ~forced.numpy()))  # last key is the primary one
        out.append(np.sort(order[:k]))
    return torch.from_numpy(np.stack(out))


def expected_kept(preset: str, layer: int, st: dict, keys: torch.Tensor, n_layers: int) -> torch.Tensor:
    hkv, L = keys.shape[1], keys.shape[2]
    B = int(L * RATIO)
    pos = torch.arange(L)
    if preset == "pyramidkv":
        B = pyramid_budgets(B, L, n_layers)[layer]
    if preset in ("h2o", "h2o-stride8"):
        recent = int(B * 0.5)
        votes = st["colsum"] if preset == "h2o" else st["stride8"]
        return _top(_group_mean(votes, hkv), (pos < 4) | (pos >= L - recent), B)
    if preset in ("snapkv", "pyramidkv"):
        # SnapKV's code and kvpress: pool the prefix's votes only, a truncated kernel over the full size
        votes = _group_mean(st["last32"], hkv)[:, : L - 32]
        pooled = F.avg_pool1d(votes[:, None], 7, stride=1, padding=3, count_include_pad=True)[:, 0]
        return _top(torch.cat([pooled, torch.full((hkv, 32), 1e9)], 1), pos >= L - 32, B)
    if preset == "tova":
        return _top(st["last"].mean(0, keepdim=True), pos >= L - 1, B).expand(hkv, B)
    if preset == "knorm":
        return _top(-keys[0].float().norm(dim=-1), torch.zeros(L, dtype=torch.bool), B)
    if preset == "streaming":
        return torch.cat([torch.arange(4), torch.arange(L - (B - 4), L)]).expand(hkv, B)
    if preset == "random":
        gen = torch.Generator().manual_seed(layer)  # seed 0 * 100003 + layer
        return _top(torch.rand(1, 1, L, generator=gen)[0], pos < 4, B).expand(hkv, B)
    raise AssertionError(preset)


def pyramid_budgets(avg: int, length: int, n_layers: int, w: int = 32, beta: float = 20.0) -> list[int]:
    """PyramidKV's layer budgets (its code: the largest capped at the prompt, the smallest raised to keep the
    mean), rounded by largest remainder so that they add up to ``n_layers * avg``."""
    m = avg - w
    hi = min(2 * m - m / beta, length - w)
    lo = 2 * m - hi
    raw = np.array([w + hi - i * (hi - lo) / (n_layers - 1) for i in range(n_layers)])
    out = np.floor(raw).astype(int)
    order = np.lexsort((np.arange(n_layers), -(raw - out)))
    out[order[: n_layers * avg - out.sum()]] += 1
    return out.tolist()


def test_pyramid_budgets_add_up_above_half_the_prompt():
    """At 0.8 of 4000 tokens the schedule caps its largest layer at the prompt and keeps the total."""
    policy = kvpolicy.load_policy("pyramidkv", budget=0.8)
    got = [int(b.total) for b in policy.layer_budgets(30, torch.tensor([4000]))]
    assert sum(got) == 30 * 3200
    assert got == pyramid_budgets(3200, 4000, 30)
    assert got[0] == 4000 and got[-1] == 2400
    rows = policy.layer_budgets(30, torch.tensor([4000, 1000]))  # per row, the same rule
    assert sum(int(b.total[1]) for b in rows) == 30 * 800


def _policy(preset: str) -> object:
    if preset == "h2o-stride8":  # H2O's score estimated from every 8th prefill query
        cfg = kvpolicy.load_policy("h2o").to_config()
        cfg["scorer"]["query_stride"] = 8
        return kvpolicy.load_policy(cfg)
    return preset


@pytest.mark.parametrize("preset", ["streaming", "h2o", "h2o-stride8", "snapkv", "tova", "knorm", "random",
                                    "pyramidkv"])
def test_baseline_keeps_the_reference_entries_and_generates(smollm2, smol_passage, reference, preset):
    model, _ = smollm2
    stats, full = reference
    L = smol_passage.shape[1]
    n_layers = len(model.model.layers)
    with torch.no_grad(), kvpolicy.compress(model, _policy(preset), budget=RATIO) as cache:
        out = model.generate(input_ids=smol_passage, cache=cache, max_new_tokens=32, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    assert out.sequences.shape[1] == L + 32
    mismatches = 0
    gathered = DynamicCache()
    for li in range(n_layers):
        keys, values = full.layers[li].keys, full.layers[li].values
        want = expected_kept(preset, li, stats[li], keys, n_layers)
        layer = cache.layers[li]
        budget = want.shape[1]
        assert layer.physical_length == budget + 31, f"layer {li}"  # 31 decoded tokens appended
        got = layer.positions[0, :, :budget]
        mismatches += int((got != want).sum())
        idx = want[None, :, :, None].expand(1, -1, -1, keys.shape[-1])
        gathered.update(keys.gather(2, idx), values.gather(2, idx), li)
    # attention-based scores are recomputed in fp32 by both sides; allow a rare boundary tie to flip
    print(f"{preset}: {mismatches} mismatches")
    assert mismatches <= 2, f"{mismatches} kept positions differ from the reference"
    if mismatches == 0:  # the hand-gathered cache gives the same next-token logits
        with torch.no_grad():
            first = out.sequences[:, L:L + 1]
            ref = model(input_ids=first, position_ids=torch.tensor([[L]]),
                        **cache_kwargs(model, gathered)).logits[:, -1]
        torch.testing.assert_close(out.logits[1], ref, atol=1e-4, rtol=0)


def test_snapkv_budget_below_its_window_keeps_the_most_recent_window_entries(tiny_llama):
    """Window entries rank by recency above every prefix entry: a 10-entry budget keeps the last 10."""
    ids = torch.randint(3, 100, (2, 50))
    policy = kvpolicy.load_policy({"scorer": {"name": "snapkv", "window": 32},
                                   "budget": {"tokens": 10, "sink": 0, "recent": 0}})
    with torch.no_grad(), kvpolicy.compress(tiny_llama, policy) as cache:
        tiny_llama(input_ids=ids, cache=cache)
    for layer in cache.layers:
        assert torch.equal(layer.positions, torch.arange(40, 50).expand(2, layer.positions.shape[1], 10))


def _snapkv_ctx(votes: torch.Tensor, valid: torch.Tensor, total: int):
    from kvpolicy.policy import CompressionContext, LayerBudget

    b, h, s = votes.shape
    lb = LayerBudget(total=torch.full((b,), total), sink=0, recent=torch.zeros(b, dtype=torch.long))
    ctx = CompressionContext(layer_idx=0, n_layers=1, phase="prefill", keys=torch.randn(b, h, s, 4),
                             values=torch.randn(b, h, s, 4), positions=torch.arange(s).expand(b, h, s),
                             valid=valid, is_image=torch.zeros(b, h, s, dtype=torch.bool), budget=lb, scaling=0.5)
    ctx._memo[("win", 32)] = votes  # the window attention, as the observation would give it
    return ctx


def test_snapkv_pools_the_votes_of_the_prefix_only():
    """The window's large self-votes must not spill through the kernel into the entries just before it
    (SnapKV's code and kvpress pool the prefix alone, a truncated kernel divided by the full size)."""
    from kvpolicy_baselines.scorers import SnapKV

    g = torch.Generator().manual_seed(0)
    s, w = 400, 32
    votes = torch.rand(1, 1, s, generator=g) * 0.004
    votes[..., -w:] = 1.0  # the window attends to itself
    ctx = _snapkv_ctx(votes, torch.ones(1, 1, s, dtype=torch.bool), total=80)
    scores = SnapKV(window=w, kernel=7).score(ctx)
    ref = F.avg_pool1d(votes[..., :-w], 7, stride=1, padding=3, count_include_pad=True)
    torch.testing.assert_close(scores[..., :-w], ref, rtol=0, atol=1e-7)
    assert float(scores[0, 0, s - 34]) < 0.004  # today's bug gave ~0.14 here: above every real vote
    assert bool((scores[..., -w:] > scores[..., :-w].max()).all())


def test_snapkv_left_padding_pools_like_the_sequence_start():
    from kvpolicy_baselines.scorers import SnapKV

    g = torch.Generator().manual_seed(1)
    s, pad = 120, 9
    alone = torch.rand(1, 2, s, generator=g)
    padded = torch.cat([torch.zeros(1, 2, pad), alone], -1)
    valid = torch.cat([torch.zeros(1, 2, pad, dtype=torch.bool), torch.ones(1, 2, s, dtype=torch.bool)], -1)
    a = SnapKV().score(_snapkv_ctx(alone, torch.ones(1, 2, s, dtype=torch.bool), 40))
    p = SnapKV().score(_snapkv_ctx(padded, valid, 40))
    torch.testing.assert_close(p[..., pad:], a, rtol=0, atol=0)


@pytest.mark.parametrize("preset", ["snapkv", "pyramidkv", "h2o", "tova", "knorm", "streaming", "random"])
def test_a_row_alone_and_left_padded_in_a_batch_keeps_the_same_entries(tiny_llama, preset):
    g = torch.Generator().manual_seed(2)
    long_row = torch.randint(3, 100, (1, 90), generator=g)
    short = torch.randint(3, 100, (1, 60), generator=g)
    pad = 30
    ids = torch.cat([long_row, torch.cat([torch.zeros(1, pad, dtype=torch.long), short], 1)])
    mask = (ids != 0).long()
    mask[0] = 1
    policy = kvpolicy.load_policy(preset, budget=0.3)
    with torch.no_grad():
        with kvpolicy.compress(tiny_llama, policy) as alone:
            tiny_llama(input_ids=short, cache=alone)
        with kvpolicy.compress(tiny_llama, policy) as batch:
            tiny_llama(input_ids=ids, attention_mask=mask, cache=batch)
    for la, lb in zip(alone.layers, batch.layers):
        for h in range(la.positions.shape[1]):
            want = la.positions[0, h][la.valid[0, h]] + pad
            got = lb.positions[1, h][lb.valid[1, h]]
            assert torch.equal(got, want), f"layer {la.layer_idx} head {h}"
