"""The structured plugin: ChunkKV, SimLayerKV, Finch (+ chunked top-k) and the ``kvzip-uniform`` preset.

Each method's kept entries are checked against an independent reference written here with plain Python /
numpy loops on small tensors (naive softmax, no kvpolicy helper), then every preset runs on SmolLM2 with
real text (sizes and a real ``generate()``), and the invariant kit runs on small-window variants that
exercise the code paths the kit's short sequences would not reach with the presets' windows.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

import kvpolicy
from kvpolicy import testing as kit
from kvpolicy.errors import BudgetWarning
from kvpolicy.policy import LayerBudget
from kvpolicy_structured import ChunkedTopK, ChunkKV, apportion

pytestmark = pytest.mark.filterwarnings("ignore::kvpolicy.errors.BudgetWarning")


# --------------------------------------------------------------------------------------------- helpers
def _case(batch=2, kv_heads=2, group=2, seq=40, pads=(0, 7), seed=0) -> kit.Case:
    return kit.Case(batch=batch, kv_heads=kv_heads, group=group, seq=seq, head_dim=8, dtype=torch.float32,
                    pads=pads, pattern="random", image_share=0.0, budget={"tokens": 10}, layer_idx=0, n_layers=1,
                    seed=seed)


def _context(policy, case: kit.Case, total: int, sink: int = 0, recent: int = 0):
    inputs = kit.make_inputs(case)
    n = inputs.valid[:, 0].sum(-1)
    lb = LayerBudget(total=torch.minimum(torch.full((case.batch,), total), n), sink=sink,
                     recent=torch.full((case.batch,), recent), seen=n)
    return kit.make_context(policy, case, inputs, budget=lb), inputs


def _kept(ctx, selection) -> list[list[set[int]]]:
    h = ctx.shape[1]
    idx = selection.indices.expand(-1, h, -1)
    kept = selection.kept.expand(-1, h, -1)
    return [[set(idx[r, j][kept[r, j]].tolist()) for j in range(h)] for r in range(ctx.shape[0])]


def _ranked(keys: list[tuple]) -> list[int]:
    """Indices of ``keys`` (tuples, smaller = better) in increasing order."""
    return [i for i, _ in sorted(enumerate(keys), key=lambda t: t[1])]


def _attention(q: np.ndarray, k: np.ndarray, scale: float) -> np.ndarray:
    """Naive softmax attention of one query ``[D]`` over keys ``[n, D]`` (float64)."""
    logits = k.astype(np.float64) @ q.astype(np.float64) * scale
    e = np.exp(logits - logits.max())
    return e / e.sum()


# --------------------------------------------------------------------------------------------- ChunkKV
def ref_chunkkv(scores: np.ndarray, valid: np.ndarray, chunk: int, total: int, sink: int, recent: int) -> set[int]:
    """One row: ``scores [H, S]``, ``valid [S]``."""
    pos = [j for j in range(len(valid)) if valid[j]]
    shared = scores.mean(0)
    chunks = [pos[i:i + chunk] for i in range(0, len(pos), chunk)]
    means = [float(np.mean([shared[j] for j in c])) for c in chunks]
    chunk_order = _ranked([(-m, i) for i, m in enumerate(means)])
    place = {c: r for r, c in enumerate(chunk_order)}
    of = {j: i // chunk for i, j in enumerate(pos)}
    forced = set(pos[:sink]) | set(pos[len(pos) - recent:] if recent else [])
    order = _ranked([(j not in forced, place[of[j]], -shared[j], j) for j in pos])
    return {pos[i] for i in order[:min(total, len(pos))]}


@pytest.mark.parametrize("chunk, total, sink, recent, seed", [(3, 10, 0, 0, 0), (4, 13, 1, 2, 1), (5, 7, 2, 0, 2),
                                                              (7, 30, 0, 3, 3), (1, 9, 0, 0, 4), (50, 12, 0, 0, 5)])
def test_chunkkv_keeps_the_reference_chunks(chunk, total, sink, recent, seed):
    case = _case(seed=seed)
    policy = kvpolicy.load_policy({"budget": 0.5, "scorer": "knorm", "selector": {"name": "chunkkv", "chunk": chunk}})
    ctx, _ = _context(policy, case, total, sink, recent)
    scores = torch.randn(case.batch, case.kv_heads, case.seq, generator=torch.Generator().manual_seed(seed))
    sel = ChunkKV(chunk=chunk).select(ctx, scores, None)
    got = _kept(ctx, sel)
    for r in range(case.batch):
        want = ref_chunkkv(scores[r].double().numpy(), ctx.valid[r, 0].numpy(), chunk, total, sink, recent)
        assert all(g == want for g in got[r]), (r, sorted(got[r][0]), sorted(want))
        assert len(want) == min(total, int(ctx.valid[r, 0].sum()))


def test_chunkkv_keeps_whole_chunks_and_at_most_one_partial():
    """With no protected entries, the kept set is whole chunks plus the best entries of one more chunk."""
    case = _case(batch=1, pads=(0,), seq=60)
    policy = kvpolicy.load_policy({"budget": 0.5, "scorer": "knorm", "selector": {"name": "chunkkv", "chunk": 8}})
    ctx, _ = _context(policy, case, 27)
    sel = ChunkKV(chunk=8).select(ctx, torch.rand(1, 2, 60, generator=torch.Generator().manual_seed(9)), None)
    kept = _kept(ctx, sel)[0][0]
    per_chunk = np.bincount([j // 8 for j in kept], minlength=8)
    sizes = np.bincount(np.arange(60) // 8, minlength=8)
    assert int(((per_chunk > 0) & (per_chunk < sizes)).sum()) <= 1
    assert int((per_chunk == sizes).sum()) == 3 and len(kept) == 27


# --------------------------------------------------------------------------------------------- SimLayerKV
def ref_simlayerkv(inputs, r: int, threshold: float, n_initial: int, n_recent: int, n_last: int,
                   rule: str = "paper") -> tuple[set, float]:
    valid = inputs.valid[r, 0].numpy()
    pos = [j for j in range(len(valid)) if valid[j]]
    keys, queries = inputs.keys[r].numpy(), inputs.queries[r].numpy()
    heads, hkv = queries.shape[0], keys.shape[0]
    scale = keys.shape[-1] ** -0.5
    keep = scored = set(pos[:n_initial]) | set(pos[-n_recent:])
    minimum = n_initial + n_recent
    if rule == "kvpress":  # SnapKV's helper drops the last n_last key columns; lazy layers keep n_recent - n_last
        scored = set(pos[:n_initial]) | set(pos[:-n_last][-n_recent:])
        keep = set(pos[:n_initial]) | set(pos[len(pos) - (n_recent - n_last):])
        minimum += n_last
    last = pos[-n_last:]
    mass = 0.0
    for h in range(heads):
        k = keys[h // (heads // hkv)]
        for qi in last:
            seen = [j for j in pos if j <= qi]
            a = _attention(queries[h, qi], k[seen], scale)
            mass += sum(w for j, w in zip(seen, a) if j in scored)
    mass /= heads * len(last)
    lazy = len(pos) > minimum and mass > threshold
    return (keep if lazy else set(pos)), mass


@pytest.mark.parametrize("threshold, n_initial, n_recent, n_last, seed, rule", [
    (0.3, 2, 6, 1, 0, "paper"), (0.5, 1, 10, 3, 1, "paper"), (0.0, 4, 4, 1, 2, "paper"), (1.0, 2, 6, 1, 3, "paper"),
    (0.6, 0, 15, 2, 4, "paper"), (0.3, 2, 6, 1, 0, "kvpress"), (0.5, 1, 10, 3, 1, "kvpress"),
    (0.45, 4, 20, 2, 5, "kvpress")])
def test_simlayerkv_decisions_match_the_reference(threshold, n_initial, n_recent, n_last, seed, rule):
    case = _case(seed=seed)
    sel_cfg = {"name": "simlayerkv", "threshold": threshold, "n_initial": n_initial, "n_recent": n_recent,
               "n_last": n_last, "window_rule": rule}
    policy = kvpolicy.load_policy({"budget": 0.5, "scorer": "streaming", "selector": sel_cfg})
    ctx, inputs = _context(policy, case, 5)
    sel, _ = policy.compress(ctx)
    got = _kept(ctx, sel)
    lazy = 0
    for r in range(case.batch):
        want, mass = ref_simlayerkv(inputs, r, threshold, n_initial, n_recent, n_last, rule)
        assert all(g == want for g in got[r]), (r, mass)
        lazy += len(want) < int(ctx.valid[r, 0].sum())
    assert ctx.figures["lazy"] == lazy
    assert ctx.figures["over_budget"] == sum(max(0, len(g[0]) - 5) for g in got)


def test_simlayerkv_warns_that_it_cannot_honour_a_budget(tiny_llama):
    policy = kvpolicy.load_policy({"budget": 0.2, "scorer": "streaming",
                                   "selector": {"name": "simlayerkv", "threshold": 0.0, "n_recent": 16}})
    ids = torch.randint(3, 100, (1, 60), generator=torch.Generator().manual_seed(0))
    with pytest.warns(BudgetWarning, match=r"selector 'simlayerkv' \(threshold 0.0\) keeps what its lazy-layer rule "
                                           r"gives, more than the budget \(ratio 0.2\)"):
        with torch.no_grad(), kvpolicy.compress(tiny_llama, policy) as cache:
            tiny_llama(input_ids=ids, cache=cache)
    assert [int(layer.valid[0, 0].sum()) for layer in cache.layers] == [20, 20]  # 4 sinks + 16 recent


# --------------------------------------------------------------------------------------------- Finch
def ref_finch(inputs, r: int, window: int, total: int, normalize: bool = True) -> list[set[int]]:
    valid = inputs.valid[r, 0].numpy()
    pos = [j for j in range(len(valid)) if valid[j]]
    keys, queries = inputs.keys[r].numpy(), inputs.queries[r].numpy()
    heads, hkv = queries.shape[0], keys.shape[0]
    g, scale = heads // hkv, keys.shape[-1] ** -0.5
    question, context = pos[-window:], pos[:-window]
    out = []
    for kh in range(hkv):
        score = {j: 0.0 for j in context}
        for qi in question:
            seen = [j for j in pos if j <= qi]
            n_i = len(seen) - 1 if normalize else 1  # valid entries before the query
            for h in range(kh * g, (kh + 1) * g):
                for j, w in zip(seen, _attention(queries[h, qi], keys[kh][seen], scale)):
                    if j in score:
                        score[j] += n_i * w / (g * window)
        best = _ranked([(-score[j], j) for j in context])[:max(0, total - window)]
        out.append(set(question[-total:]) | {context[i] for i in best})
    return out


@pytest.mark.parametrize("window, total, normalize, seed", [(4, 12, True, 0), (6, 20, True, 1), (3, 8, False, 2),
                                                            (1, 5, True, 3), (8, 6, True, 4)])
def test_finch_keeps_the_reference_entries(window, total, normalize, seed):
    case = _case(seed=seed)
    policy = kvpolicy.load_policy({"budget": {"ratio": 0.5, "sink": 0},
                                   "scorer": {"name": "finch", "window": window, "normalize": normalize}})
    ctx, inputs = _context(policy, case, total)
    sel, _ = policy.compress(ctx)
    got = _kept(ctx, sel)
    for r in range(case.batch):
        assert got[r] == ref_finch(inputs, r, window, total, normalize), r


def test_finch_normalisation_is_what_separates_it_from_the_plain_mean():
    case = _case(seed=5, seq=60)
    plain = kvpolicy.load_policy({"budget": 0.5, "scorer": {"name": "finch", "window": 8, "normalize": False}})
    ctx, _ = _context(plain, case, 20)
    torch.testing.assert_close(plain.scorer.score(ctx)[ctx.valid & (torch.arange(60) < 45)],
                               (ctx.window_attention(8) / 8)[ctx.valid & (torch.arange(60) < 45)])


# --------------------------------------------------------------------------------------------- chunked top-k
def ref_chunked(scores: np.ndarray, valid: np.ndarray, chunk: int, total: int, sink: int, recent: int) -> list[set]:
    pos = [j for j in range(len(valid)) if valid[j]]
    forced = set(pos[:sink]) | set(pos[len(pos) - recent:] if recent else [])
    pool = [j for j in pos if j not in forced]
    of = {j: i // chunk for i, j in enumerate(pos)}
    n_chunks = -(-len(pos) // chunk)
    sizes = [sum(of[j] == m for j in pool) for m in range(n_chunks)]
    room = min(max(0, total - len(forced)), len(pool))
    exact = [Fraction(room * s, max(1, len(pool))) for s in sizes]
    quota = [math.floor(x) for x in exact]
    for m in _ranked([(-(x - math.floor(x)), m) for m, x in enumerate(exact)])[:room - sum(quota)]:
        quota[m] += 1
    out = []
    for h in range(scores.shape[0]):
        keep = set(forced)
        for m in range(n_chunks):
            members = [j for j in pool if of[j] == m]
            keep |= {members[i] for i in _ranked([(-scores[h, j], j) for j in members])[:quota[m]]}
        out.append(keep)
    return out


@pytest.mark.parametrize("chunk, total, sink, recent, seed", [(8, 12, 0, 0, 0), (5, 15, 1, 3, 1), (16, 9, 2, 2, 2),
                                                              (3, 25, 0, 4, 3), (100, 11, 0, 0, 4)])
def test_chunked_topk_keeps_each_chunks_share(chunk, total, sink, recent, seed):
    case = _case(seed=seed)
    policy = kvpolicy.load_policy({"budget": 0.5, "scorer": "knorm", "selector": {"name": "chunked-topk", "chunk": chunk}})
    ctx, _ = _context(policy, case, total, sink, recent)
    scores = torch.randn(case.batch, case.kv_heads, case.seq, generator=torch.Generator().manual_seed(seed))
    got = _kept(ctx, ChunkedTopK(chunk=chunk).select(ctx, scores, None))
    for r in range(case.batch):
        assert got[r] == ref_chunked(scores[r].double().numpy(), ctx.valid[r, 0].numpy(), chunk, total, sink, recent)


def test_apportion_adds_up_and_stays_within_the_chunks():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        sizes = torch.randint(0, 30, (3, 7), generator=g)
        total = (sizes.sum(-1).double() * torch.rand(3, generator=g, dtype=torch.float64)).floor().long()
        q = apportion(total, sizes)
        assert torch.equal(q.sum(-1), total) and bool((q <= sizes).all()) and bool((q >= 0).all())


# --------------------------------------------------------------------------------------------- the kit
SMALL = {
    "chunkkv": {"budget": {"ratio": 0.5, "sink": 1, "recent": 0.25}, "scorer": {"name": "snapkv", "window": 4,
                "kernel": 3}, "selector": {"name": "chunkkv", "chunk": 3}},
    "simlayerkv": {"budget": {"ratio": 0.5, "sink": 0}, "scorer": "streaming",
                   "selector": {"name": "simlayerkv", "threshold": 0.3, "n_initial": 1, "n_recent": 4, "n_last": 2}},
    "simlayerkv-kvpress": {"budget": {"ratio": 0.5, "sink": 0}, "scorer": "streaming",
                           "selector": {"name": "simlayerkv", "threshold": 0.3, "n_initial": 1, "n_recent": 5,
                                        "n_last": 2, "window_rule": "kvpress"}},
    "finch": {"budget": {"ratio": 0.5, "sink": 0}, "scorer": {"name": "finch", "window": 4}},
    "chunked-finch": {"budget": {"ratio": 0.5, "sink": 1, "recent": 0.25}, "scorer": {"name": "finch", "window": 3},
                      "selector": {"name": "chunked-topk", "chunk": 5}},
}


@pytest.mark.parametrize("name", sorted(SMALL))
def test_small_window_variants_keep_the_invariants(name):
    """The presets' windows (64, 1024, 32 tokens) cover the kit's short sequences; small ones exercise the
    chunking, the lazy rule and the question scoring on every kit case (batch independence included)."""
    kit.check_policy(SMALL[name])


@pytest.mark.parametrize("name", ["chunkkv", "simlayerkv", "finch"])
def test_a_row_alone_and_left_padded_in_a_batch_keeps_the_same_entries(tiny_llama, name):
    g = torch.Generator().manual_seed(3)
    short = torch.randint(3, 100, (1, 70), generator=g)
    pad = 25
    ids = torch.cat([torch.randint(3, 100, (1, 95), generator=g), torch.cat([torch.zeros(1, pad, dtype=torch.long),
                                                                               short], 1)])
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    policy = kvpolicy.load_policy(SMALL[name])
    with torch.no_grad(), kvpolicy.compress(tiny_llama, policy) as alone:
        tiny_llama(input_ids=short, cache=alone)
    with torch.no_grad(), kvpolicy.compress(tiny_llama, policy) as batch:
        tiny_llama(input_ids=ids, attention_mask=mask, cache=batch)
    for la, lb in zip(alone.layers, batch.layers):
        for h in range(la.positions.shape[1]):
            assert torch.equal(lb.positions[1, h][lb.valid[1, h]], la.positions[0, h][la.valid[0, h]] + pad)


# --------------------------------------------------------------------------------------------- SmolLM2
@pytest.mark.slow
@pytest.mark.parametrize("preset", ["chunkkv", "simlayerkv", "finch", "kvzip-uniform"])
def test_presets_on_smollm2_keep_their_sizes_and_generate(smollm2, smol_passage, preset):
    model, tok = smollm2
    L = smol_passage.shape[1]
    kw = {"tokenizer": tok} if preset == "kvzip-uniform" else {}
    with torch.no_grad(), kvpolicy.compress(model, preset, budget=0.2, **kw) as cache:
        out = model.generate(input_ids=smol_passage, cache=cache, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert out.shape[1] == L + 8 and tok.decode(out[0, L:]).strip()
    budget = int(L * 0.2)
    for layer in cache.layers:
        n = int(layer.valid[0, 0].sum())
        pos = layer.positions[0][layer.valid[0]].view(layer.positions.shape[1], -1)
        figures = layer.events[0].figures
        if preset == "simlayerkv":
            lazy = figures["lazy"] == 1
            assert n == (4 + 1024 + 7 if lazy else L + 7), layer.layer_idx
            if lazy:
                assert torch.equal(pos[0, :4], torch.arange(4)) and torch.equal(pos[0, 4:1028], torch.arange(L - 1024, L))
            continue
        assert n == budget + 7, (preset, layer.layer_idx)
        if preset == "chunkkv":  # one choice per layer: whole 20-token chunks and at most one partial one
            assert bool((pos == pos[:1]).all())
            counts = torch.bincount(pos[0, :budget] // 20, minlength=-(-L // 20))
            assert int(((counts > 0) & (counts < torch.bincount(torch.arange(L) // 20))).sum()) <= 1
            assert figures["chunks"] == -(-L // 20)
        if preset == "finch":  # the question (last 32 prompt tokens) is kept by every head
            assert bool((pos[:, budget - 32:budget] == torch.arange(L - 32, L)).all())
        if preset == "kvzip-uniform":
            assert bool((pos[:, :4] == torch.arange(4)).all())  # 4 sinks
