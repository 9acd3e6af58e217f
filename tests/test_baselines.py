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
                      "stride8": probs[:, (L - 1) % 8::8].sum(1)})  # queries L-1, L-9, ... (strided H2O)

    handles = [layer.self_attn.register_forward_hook(hook) for layer in model.model.layers]
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            cache = DynamicCache()
            model(input_ids=smol_passage, cache=cache, output_attentions=True)
    finally:
        model.set_attn_implementation("sdpa")
        for h in handles:
            h.remove()
    return stats, cache


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
        w, m = 32, B - 32
        lo, hi = m / 20, 2 * m - m / 20
        B = int(w + hi - layer * (hi - lo) / (n_layers - 1))
    if preset in ("h2o", "h2o-stride8"):
        recent = int(B * 0.5)
        votes = st["colsum"] if preset == "h2o" else st["stride8"]
        return _top(_group_mean(votes, hkv), (pos < 4) | (pos >= L - recent), B)
    if preset in ("snapkv", "pyramidkv"):
        votes = _group_mean(st["last32"], hkv)
        pooled = F.avg_pool1d(votes[:, None], 7, stride=1, padding=3, count_include_pad=False)[:, 0]
        return _top(pooled, pos >= L - 32, B)
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
            ref = model(input_ids=first, position_ids=torch.tensor([[L]]), cache=gathered).logits[:, -1]
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
