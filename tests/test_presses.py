"""The kvpress-derived presses (plugins/kvpolicy_presses): ExpectedAttention, KeyDiff, LagKV, leverage scores.

Each method's kept entries are checked against an independent reference written here (numpy, explicit RoPE
matrices, plain loops over chunks, ``pinv``; none of the package's helpers), first on small random tensors
with a left-padded row, then on SmolLM2 with ~1500 tokens of real text (the references read the model's own
pre-RoPE queries and keys through ``q_proj`` / ``k_proj`` hooks and its own rotary embedding). kvpress itself
is compared in ``docs/methods/presses.md`` (``benchmarks/presses_kvpress.py``), not here: it
lives in its own virtualenv.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import DynamicCache

import kvpolicy
from kvpolicy import testing as kit
from kvpolicy.compat import cache_kwargs
from kvpolicy.policy import CompressionContext, LayerBudget

PRESETS = ["expected-attention", "keydiff", "lagkv", "leverage", "leverage-kv"]


# --------------------------------------------------------------------------------------------- references
def rope_matrix(pos: int, d: int, theta: float) -> np.ndarray:
    """``[D, D]`` RoPE rotation at position ``pos``: pair ``(k, k + D/2)`` turned by ``pos * theta^(-2k/D)``."""
    r = np.zeros((d, d))
    for k in range(d // 2):
        a = pos * theta ** (-2 * k / d)
        c, s = np.cos(a), np.sin(a)
        r[k, k], r[k, k + d // 2] = c, -s
        r[k + d // 2, k], r[k + d // 2, k + d // 2] = s, c
    return r


def top_k(scores: np.ndarray, k: int, forced: np.ndarray) -> list[int]:
    """Forced entries first, then the highest scores, ties to the lower position (sorted positions)."""
    order = np.lexsort((np.arange(len(scores)), -scores, ~forced))
    return sorted(order[:k].tolist())


def ref_expected_attention(q_pre: np.ndarray, k_post: np.ndarray, v: np.ndarray, *, theta: float, scale: float,
                           n_future: int = 512, n_sink: int = 4, window: int | None = None,
                           rotations: np.ndarray | None = None) -> np.ndarray:
    """kvpress's ExpectedAttentionPress.score for one row: ``q_pre [H, n, D]`` pre-RoPE queries, ``k_post`` /
    ``v [Hkv, n, D]``; ``rotations [n_future, D, D]`` (default: explicit RoPE matrices at n .. n + n_future - 1)."""
    h, n, d = q_pre.shape
    hkv = k_post.shape[0]
    g = h // hkv
    qs = q_pre[:, n_sink:] if window is None else q_pre[:, n_sink:][:, -window:]
    mu = qs.mean(1)
    cen = qs - mu[:, None]
    cov = np.einsum("hni,hnj->hij", cen, cen) / qs.shape[1]
    if rotations is None:
        rotations = np.stack([rope_matrix(t, d, theta) for t in range(n, n + n_future)])
    rbar = rotations.mean(0)
    mu_f = mu @ rbar.T
    cov_f = rbar @ cov @ rbar.T
    out = np.zeros((hkv, n))
    for j in range(hkv):
        keys = k_post[j, n_sink:]
        probs = []
        for head in range(j * g, (j + 1) * g):
            logit = scale * keys @ mu_f[head] + scale**2 / 2 * np.einsum("ni,ij,nj->n", keys, cov_f[head], keys)
            e = np.exp(logit - logit.max())
            probs.append(e / e.sum())
        score = np.mean(probs, 0) * np.linalg.norm(v[j, n_sink:], axis=-1)
        out[j] = np.concatenate([np.full(n_sink, score.max() + 1), score])
    return out


def ref_keydiff(k: np.ndarray) -> np.ndarray:
    """``[Hkv, n]``: minus the cosine of each key to the mean unit key."""
    out = []
    for keys in k:
        anchor = np.mean([x / np.linalg.norm(x) for x in keys], 0)
        out.append([-(x @ anchor) / (np.linalg.norm(x) * np.linalg.norm(anchor)) for x in keys])
    return np.array(out)


def ref_lagkv(k: np.ndarray, v: np.ndarray, *, n_sink: int = 4, lag: int = 128, cross: bool = False) -> np.ndarray:
    """kvpress's LagKVPress.score for one row, with plain loops (ties rank the earlier token lower)."""
    hkv, n, _ = k.shape
    out = np.ones((hkv, n))
    for j in range(hkv):
        if n < n_sink + 2 * lag:
            out[j, n_sink:] = np.arange(n - n_sink) / (n - n_sink)
            continue
        n_chunks = (n - n_sink) // lag
        for c in range(n_chunks - 1):
            lo, ref = n_sink + c * lag, n_sink + (c + 1) * lag
            chunk = np.zeros(lag)
            for x in (k[j], v[j]):
                mn, mx = x[ref:ref + lag].min(0), x[ref:ref + lag].max(0)
                std = np.array([np.std((x[lo + t] - mn) / (mx - mn), ddof=1) for t in range(lag)])
                e = np.exp(std - std.max())
                chunk += e / e.sum() / 2
            if not cross:
                chunk = np.argsort(np.argsort(chunk, kind="stable"), kind="stable") / lag
            out[j, lo:lo + lag] = chunk
    return out


def ref_leverage(x: np.ndarray) -> np.ndarray:
    """``[n]``: diag of the projection onto the column space of the centred rows (via ``pinv``)."""
    x = x - x.mean(0)
    return np.einsum("ij,ji->i", x, np.linalg.pinv(x))


# --------------------------------------------------------------------------------------------- small tensors
def _context(keys, values, queries, pads, total, sink) -> CompressionContext:
    """A prefill context over ``[B, Hkv, S, D]`` tensors whose row ``b`` is left-padded by ``pads[b]`` slots."""
    b, h, s, _ = keys.shape
    valid = torch.ones(b, h, s, dtype=torch.bool)
    for r, p in enumerate(pads):
        valid[r, :, :p] = False
    lb = LayerBudget(total=torch.full((b,), total), sink=sink, recent=torch.zeros(b, dtype=torch.long))
    bias = torch.zeros(b, h, s).masked_fill(~valid, float("-inf"))
    return CompressionContext(layer_idx=0, n_layers=1, phase="prefill", keys=keys, values=values,
                              positions=torch.arange(s).expand(b, h, s), valid=valid,
                              is_image=torch.zeros(b, h, s, dtype=torch.bool), budget=lb, scaling=keys.shape[-1] ** -0.5,
                              queries=queries, query_pos=torch.arange(s).expand(b, s), query_valid=valid[:, 0],
                              key_bias=bias)


def _inputs(seed: int, s: int = 60, d: int = 16, hkv: int = 2, g: int = 3, pads=(0, 7), theta: float = 1e4):
    """Random pre-RoPE queries/keys per row, rotated with each row's true positions 0 .. n-1 (a left-padded row
    starts at 0 after its pads, as transformers' generate numbers it), values; tensors and the row-wise truth."""
    rng = np.random.default_rng(seed)
    b = len(pads)
    q_post = np.zeros((b, hkv * g, s, d))
    k_post = np.zeros((b, hkv, s, d))
    vals = rng.normal(size=(b, hkv, s, d)) * 2
    rows = []
    for r, p in enumerate(pads):
        n = s - p
        q_pre = rng.normal(size=(hkv * g, n, d)) + rng.normal(size=d)  # a shared mean: a non-trivial mu
        k_pre = rng.normal(size=(hkv, n, d)) + rng.normal(size=d) * 3
        rot = np.stack([rope_matrix(i, d, theta) for i in range(n)])  # [n, D, D]
        q_post[r, :, p:] = np.einsum("nij,hnj->hni", rot, q_pre)
        k_post[r, :, p:] = np.einsum("nij,hnj->hni", rot, k_pre)
        q_post[r, :, :p] = 9.0  # recognisable garbage in the pads
        k_post[r, :, :p] = 9.0
        rows.append({"q_pre": q_pre, "k_pre": k_pre, "k_post": k_post[r, :, p:], "v": vals[r, :, p:], "pad": p})
    t = lambda x: torch.from_numpy(x).float()  # noqa: E731
    return t(k_post), t(vals), t(q_post), rows


def _kept(ctx: CompressionContext, policy_name: str, **scorer) -> list[list[list[int]]]:
    """Kept positions per row and KV head, counted from each row's first valid entry."""
    cfg = kvpolicy.load_policy(policy_name).to_config()
    cfg["scorer"].update(scorer)
    selection, _ = kvpolicy.load_policy(cfg).compress(ctx)
    pads = (~ctx.valid[:, 0]).sum(-1)
    out = []
    for r in range(ctx.shape[0]):
        out.append([(selection.indices[r, j][selection.kept[r, j]] - pads[r]).tolist()
                    for j in range(selection.indices.shape[1])])
    return out


@pytest.mark.parametrize("window", [None, 16])
def test_expected_attention_keeps_the_reference_entries(window):
    theta = 1e4
    keys, values, queries, rows = _inputs(0, theta=theta)
    total, sink = 15, 4
    ctx = _context(keys, values, queries, [r["pad"] for r in rows], total, sink)
    got = _kept(ctx, "expected-attention", rope_theta=theta, window=window)
    for r, row in enumerate(rows):
        ref = ref_expected_attention(row["q_pre"], row["k_post"], row["v"], theta=theta, scale=ctx.scaling,
                                     window=window)
        n = ref.shape[1]
        want = [top_k(ref[j], total, np.arange(n) < sink) for j in range(ref.shape[0])]
        assert got[r] == want, f"row {r}"


def test_expected_attention_without_covariance_or_value_norms():
    theta = 1e4
    keys, values, queries, rows = _inputs(1, theta=theta)
    ctx = _context(keys, values, queries, [r["pad"] for r in rows], 12, 4)
    # no covariance term: the same reference with Sigma = 0 (queries all equal to their mean)
    got = _kept(ctx, "expected-attention", rope_theta=theta, use_covariance=False, use_vnorm=False)
    for r, row in enumerate(rows):
        q_mean = np.broadcast_to(row["q_pre"][:, 4:].mean(1, keepdims=True), row["q_pre"].shape)
        ref = ref_expected_attention(np.ascontiguousarray(q_mean), row["k_post"], np.ones_like(row["v"]),
                                     theta=theta, scale=ctx.scaling)
        assert got[r] == [top_k(ref[j], 12, np.arange(ref.shape[1]) < 4) for j in range(2)], f"row {r}"


def test_keydiff_keeps_the_reference_entries():
    keys, values, queries, rows = _inputs(2)
    ctx = _context(keys, values, queries, [r["pad"] for r in rows], 14, 0)
    got = _kept(ctx, "keydiff")
    for r, row in enumerate(rows):
        ref = ref_keydiff(row["k_post"])
        assert got[r] == [top_k(x, 14, np.zeros(len(x), bool)) for x in ref], f"row {r}"


@pytest.mark.parametrize("cross", [False, True])
def test_lagkv_keeps_the_reference_entries(cross):
    keys, values, queries, rows = _inputs(3, s=75, pads=(0, 9))
    total, sink, lag = 30, 2, 8
    ctx = _context(keys, values, queries, [r["pad"] for r in rows], total, sink)
    got = _kept(ctx, "lagkv", n_sink=sink, lag_size=lag, cross_scoring=cross)
    for r, row in enumerate(rows):
        ref = ref_lagkv(row["k_post"], row["v"], n_sink=sink, lag=lag, cross=cross)
        n = ref.shape[1]
        want = [top_k(ref[j], total, np.arange(n) < sink) for j in range(2)]
        assert got[r] == want, f"row {r}"
        tail = n - (sink + ((n - sink) // lag - 1) * lag)  # the last chunk and the remainder are always kept
        assert all(set(range(n - tail, n)) <= set(x) for x in got[r])


def test_lagkv_short_rows_fall_back_to_sinks_and_recency():
    keys, values, queries, rows = _inputs(4, s=30, pads=(0, 4))
    ctx = _context(keys, values, queries, [r["pad"] for r in rows], 10, 4)
    got = _kept(ctx, "lagkv", lag_size=16)  # 30 < 4 + 2 * 16: no chunk has a reference
    for r, row in enumerate(rows):
        n = 30 - row["pad"]
        assert got[r] == [list(range(4)) + list(range(n - 6, n))] * 2


@pytest.mark.parametrize("source", ["key", "value", "kv_avg", "kv_product"])
@pytest.mark.parametrize("pre_rope", [True, False])
def test_leverage_keeps_the_reference_entries(source, pre_rope):
    theta = 1e4
    keys, values, queries, rows = _inputs(5, s=80, d=8, theta=theta)
    ctx = _context(keys, values, queries, [r["pad"] for r in rows], 20, 0)
    got = _kept(ctx, "leverage", source=source, pre_rope=pre_rope, rope_theta=theta)
    for r, row in enumerate(rows):
        for j in range(2):
            hk = ref_leverage(row["k_pre"][j] if pre_rope else row["k_post"][j])
            hv = ref_leverage(row["v"][j])
            score = {"key": hk, "value": hv, "kv_avg": (hk + hv) / 2, "kv_product": hk * hv}[source]
            assert got[r][j] == top_k(score, 20, np.zeros(len(score), bool)), f"row {r} head {j}"
    assert abs(ref_leverage(rows[0]["k_pre"][0]).sum() - 8) < 1e-9  # the rank of the centred 80 x 8 keys


def test_leverage_of_a_short_full_rank_block_ties_and_keeps_the_first():
    """Fewer rows than dimensions: every (centred) row has leverage 1 - 1/n, so ties go to the lower position."""
    keys, values, queries, rows = _inputs(6, s=6, d=16, pads=(0, 1))
    ctx = _context(keys, values, queries, [0, 1], 3, 0)
    assert _kept(ctx, "leverage") == [[[0, 1, 2]] * 2, [[0, 1, 2]] * 2]


# --------------------------------------------------------------------------------------------- invariant kit
def test_the_invariant_kit_with_small_chunks_and_windows():
    """The kit's sequences (<= 24 tokens) are shorter than the presets' 128-token LagKV chunks; smaller
    parameters exercise the lag scores, a query window and the other leverage sources."""
    for scorer in ({"name": "lagkv", "n_sink": 1, "lag_size": 3}, {"name": "lagkv", "lag_size": 2, "cross_scoring": True},
                   {"name": "expected-attention", "window": 3, "n_future_positions": 7, "n_sink": 1},
                   {"name": "leverage", "source": "kv_product", "pre_rope": False},
                   {"name": "leverage", "source": "kv_avg", "center": False}):
        kit.check_policy({"budget": {"ratio": 0.5, "sink": 1}, "scorer": scorer}, model=False)


@pytest.mark.parametrize("preset", PRESETS + ["criticalkv-vnorm", "qfilter-smollm2"])
def test_generate_keeps_the_same_entries_for_a_row_alone_and_left_padded(tiny_llama, preset):
    """generate() numbers a left-padded row's RoPE positions from its first valid token; every press then keeps,
    shifted by the padding, the entries it keeps for the row alone (LagKV reads post-RoPE keys channel by
    channel, as the paper and kvpress do, so for it this holds with those positions only)."""
    rows = torch.randint(3, 100, (2, 72), generator=torch.Generator().manual_seed(5))
    pad = 21  # not a multiple of the LagKV chunk
    batch_ids = rows.clone()
    batch_ids[1, :pad] = 0
    mask = torch.ones_like(batch_ids)
    mask[1, :pad] = 0
    cfg = kvpolicy.load_policy(preset, budget=0.25).to_config()
    if preset == "lagkv":
        cfg["scorer"]["lag_size"] = 8  # chunks inside 51 tokens
    kept = {}
    for name, ids, am in (("alone", rows[1:, pad:], None), ("batch", batch_ids, mask)):
        with torch.no_grad(), kvpolicy.compress(tiny_llama, cfg) as cache:
            tiny_llama.generate(input_ids=ids, attention_mask=am, cache=cache, max_new_tokens=1, do_sample=False,
                                pad_token_id=0)
        kept[name] = [(layer.positions[-1], layer.valid[-1]) for layer in cache.layers]
    for li, ((pa, va), (pb, vb)) in enumerate(zip(kept["alone"], kept["batch"])):
        for h in range(pa.shape[0]):
            assert torch.equal(pb[h][vb[h]], pa[h][va[h]] + pad), f"layer {li} head {h}"


# --------------------------------------------------------------------------------------------- SmolLM2
RATIO = 0.2
NEW = 8


@pytest.fixture(scope="module")
def smol_reference(smollm2, smol_passage):
    """The full cache of the passage, the model's pre-RoPE queries and keys per layer, its rotary embedding."""
    model, _ = smollm2
    pre: dict[str, list[torch.Tensor]] = {"q": [], "k": []}

    def grab(kind):
        def hook(_mod, _inp, out):
            pre[kind].append(out[0].view(out.shape[1], -1, 64).transpose(0, 1).double())  # [heads, L, D]
        return hook

    handles = [h for layer in model.model.layers for h in (
        layer.self_attn.q_proj.register_forward_hook(grab("q")), layer.self_attn.k_proj.register_forward_hook(grab("k")))]
    try:
        with torch.no_grad():
            cache = DynamicCache()
            model(input_ids=smol_passage, **cache_kwargs(model, cache))
    finally:
        for h in handles:
            h.remove()
    return cache, pre


def smol_scores(preset: str, li: int, cache, pre, model) -> np.ndarray:
    """``[Hkv, L]`` reference scores of layer ``li`` (fp64, from the full cache and the pre-RoPE projections)."""
    keys = cache.layers[li].keys[0].double().numpy()
    values = cache.layers[li].values[0].double().numpy()
    d = keys.shape[-1]
    if preset == "expected-attention":
        n = keys.shape[1]
        cos, sin = model.model.rotary_emb(torch.zeros(1, dtype=torch.float64), torch.arange(n, n + 512)[None])
        cos, sin = cos[0].double().numpy(), sin[0].double().numpy()  # the model's own RoPE, not rope_theta
        p = np.zeros((d, d))
        p[d // 2:, : d // 2], p[: d // 2, d // 2:] = np.eye(d // 2), -np.eye(d // 2)
        rot = cos[:, :, None] * np.eye(d) + sin[:, :, None] * p  # R(t) = diag(cos_t) + diag(sin_t) P
        return ref_expected_attention(pre["q"][li].numpy(), keys, values, theta=0.0, scale=d**-0.5, rotations=rot)
    if preset == "keydiff":
        return ref_keydiff(keys)
    if preset == "lagkv":
        return ref_lagkv(keys, values)
    hk = np.stack([ref_leverage(x) for x in pre["k"][li].numpy()])
    return hk if preset == "leverage" else hk * np.stack([ref_leverage(x) for x in values])


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_press_keeps_the_reference_entries_and_generates(smollm2, smol_passage, smol_reference, preset):
    model, _ = smollm2
    full, pre = smol_reference
    L = smol_passage.shape[1]
    budget = int(L * RATIO)
    sink = kvpolicy.load_policy(preset).budget.sink
    with torch.no_grad(), kvpolicy.compress(model, preset, budget=RATIO) as cache:
        out = model.generate(input_ids=smol_passage, cache=cache, max_new_tokens=NEW, min_new_tokens=NEW,
                             do_sample=False, pad_token_id=0)
    assert out.shape[1] == L + NEW
    mismatches = []
    for li, layer in enumerate(cache.layers):
        assert layer.physical_length == budget + NEW - 1, f"layer {li}"  # NEW - 1 decoded tokens appended
        scores = smol_scores(preset, li, full, pre, model)
        got = layer.positions[0, :, :budget].tolist()
        n_bad = 0
        for score, kept in zip(scores, got):
            want = top_k(score, budget, np.arange(L) < sink)
            extra = sorted(set(kept) - set(want))
            n_bad += len(extra)
            # a difference is only allowed where the reference itself hesitates: a kept entry whose reference
            # score ties the budget's boundary (fp32 RoPE in the cached keys vs fp64 here, duplicate tokens)
            edge = np.sort(score[~(np.arange(L) < sink)])[::-1][budget - sink - 1]
            assert all(abs(score[j] - edge) <= 1e-4 * abs(edge) for j in extra), (li, extra)
        mismatches.append(n_bad)
    print(f"{preset}: mismatches per layer {mismatches}")
    assert sum(mismatches) <= 0.002 * budget * 3 * len(mismatches), mismatches


# --------------------------------------------------------------------------------------------- CriticalKV
def _tova_reference(q_post: np.ndarray, k_post: np.ndarray, scale: float) -> np.ndarray:
    """``[n]``: the last query's attention averaged over every query head (TOVA's layer-shared score)."""
    h = q_post.shape[0]
    g = h // k_post.shape[0]
    out = []
    for head in range(h):
        logit = scale * k_post[head // g] @ q_post[head, -1]
        e = np.exp(logit - logit.max())
        out.append(e / e.sum())
    return np.mean(out, 0)


@pytest.mark.parametrize("with_weights", [False, True])
def test_criticalkv_keeps_the_reference_entries(tmp_path, with_weights):
    from kvpolicy_presses.criticalkv import FORMAT

    keys, vals, queries, rows = _inputs(11)
    hkv, g, d, total, sink = 2, 3, 16, 24, 2
    hidden = 20
    w = torch.randn(hidden, hkv * g * d, generator=torch.Generator().manual_seed(4))
    path = None
    if with_weights:
        path = tmp_path / "o_proj.pt"
        torch.save({"format": FORMAT, "num_attention_heads": hkv * g, "head_dim": d, "o_proj": [w]}, path)
    ctx = _context(keys, vals, queries, [r["pad"] for r in rows], total, sink)
    got = _kept(ctx, "criticalkv-vnorm", base={"name": "tova"}, out_proj=None if path is None else str(path))
    wn = w.double().numpy()
    for r, row in enumerate(rows):
        n = row["v"].shape[1]
        q_post = queries[r, :, row["pad"]:].double().numpy()
        base = _tova_reference(q_post, row["k_post"], d ** -0.5)
        for j in range(hkv):
            if with_weights:
                norm = np.mean([np.abs(row["v"][j] @ wn[:, hd * d:(hd + 1) * d].T).sum(-1)
                                for hd in range(j * g, (j + 1) * g)], 0)
            else:
                norm = np.abs(row["v"][j]).sum(-1)
            n1 = int(total * 0.5)
            first = set(np.lexsort((np.arange(n), -base))[:n1].tolist())
            score = (base + 1e-4) * norm
            score = np.array([1e30 if i in first else score[i] for i in range(n)])
            forced = np.arange(n) < sink
            assert got[r][j] == top_k(score, total, forced), (r, j)


def test_criticalkv_refuses_weights_of_another_model(tmp_path, tiny_llama):
    from kvpolicy.errors import ConfigError
    from kvpolicy_presses.criticalkv import save_out_proj

    path = save_out_proj(tiny_llama, tmp_path / "tiny.pt")
    keys, vals, queries, rows = _inputs(12, d=8)  # head_dim 8, the tiny Llama's is 16
    ctx = _context(keys, vals, queries, [0, 7], 20, 2)
    with pytest.raises(ConfigError, match="another model"):
        _kept(ctx, "criticalkv-vnorm", out_proj=str(path))
    with pytest.raises(ConfigError, match="criticalkv cannot wrap itself|base"):
        kvpolicy.load_policy("criticalkv-vnorm", scorer={"name": "criticalkv", "base": {"name": "criticalkv"}})


def test_criticalkv_projected_norm_on_the_model(tmp_path, tiny_llama):
    """``mean_h ||W_o^h v||_1`` equals the L1 norm of the model's own ``o_proj`` applied to ``v`` in head ``h``'s slot."""
    from kvpolicy_presses.criticalkv import projected_norm, save_out_proj

    path = save_out_proj(tiny_llama, tmp_path / "tiny.pt")
    attn = tiny_llama.model.layers[1].self_attn
    heads, d = 4, 16
    vals = torch.randn(1, 2, 9, d, generator=torch.Generator().manual_seed(2))
    ctx = _context(torch.randn(1, 2, 9, d), vals, torch.randn(1, heads, 9, d), [0], 5, 0)
    ctx.layer_idx = 1
    got = projected_norm(ctx, str(path))
    for kv in range(2):
        ref = []
        for h in range(kv * 2, kv * 2 + 2):
            x = torch.zeros(9, heads * d)
            x[:, h * d:(h + 1) * d] = vals[0, kv]
            ref.append(attn.o_proj(x).abs().sum(-1))
        assert torch.allclose(got[0, kv], torch.stack(ref).mean(0), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------- Q-Filters
def _ref_direction(x: np.ndarray) -> np.ndarray:
    """First right singular vector of ``x [N, D]``, signed so that the rows project positively on average."""
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    u = vt[0]
    return u if (x @ u).sum() >= 0 else -u


def test_qfilter_from_the_prompt_keeps_the_reference_entries():
    keys, vals, queries, rows = _inputs(13)
    hkv, g, total = 2, 3, 20
    ctx = _context(keys, vals, queries, [r["pad"] for r in rows], total, 0)
    got = _kept(ctx, "qfilter-smollm2", filters=None, fallback="error")
    for r, row in enumerate(rows):
        q_post = queries[r, :, row["pad"]:].double().numpy()
        for j in range(hkv):
            u = _ref_direction(q_post[j * g:(j + 1) * g].reshape(-1, q_post.shape[-1]))
            assert got[r][j] == top_k(row["k_post"][j] @ u, total, np.zeros(len(u) * 0 + row["k_post"].shape[1], bool))


def test_qfilter_file_round_trip_and_refusals(tmp_path):
    from kvpolicy.errors import ConfigError
    from kvpolicy_presses.qfilter import load_qfilters, save_qfilters

    keys, vals, queries, rows = _inputs(14)
    f = torch.randn(3, 2, 16, generator=torch.Generator().manual_seed(0))
    for suffix in (".json", ".pt"):
        path = save_qfilters(f, tmp_path / f"f{suffix}")
        assert torch.allclose(load_qfilters(str(path)), f, atol=1e-6)
        ctx = _context(keys, vals, queries, [r["pad"] for r in rows], 20, 0)
        got = _kept(ctx, "qfilter-smollm2", filters=str(path), fallback="error")
        for r, row in enumerate(rows):
            for j in range(2):
                want = top_k(row["k_post"][j] @ f[0, j].double().numpy(), 20, np.zeros(row["k_post"].shape[1], bool))
                assert got[r][j] == want
    ctx = _context(keys[..., :8], vals[..., :8], queries[..., :8], [0, 7], 20, 0)  # head_dim 8: not this file
    with pytest.raises(ConfigError, match="calibrate this model"):
        _kept(ctx, "qfilter-smollm2", filters=str(tmp_path / "f.pt"), fallback="error")
    _kept(ctx, "qfilter-smollm2", filters=str(tmp_path / "f.pt"), fallback="prompt")  # the prompt's own queries


def test_qfilter_calibration_matches_the_reference(tiny_llama):
    """Filters from calibrate_qfilters equal the SVD of the model's own post-RoPE queries (q_proj + rotary)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from kvpolicy_presses.qfilter import calibrate_qfilters

    prompts = [torch.randint(1, 128, (1, n), generator=torch.Generator().manual_seed(n)) for n in (30, 45)]
    filters = calibrate_qfilters(tiny_llama, prompts)
    assert filters.shape == (2, 2, 16)
    captured: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    hooks = [layer.self_attn.q_proj.register_forward_hook(lambda m, a, out, i=i: captured[i].append(out))
             for i, layer in enumerate(tiny_llama.model.layers)]
    with torch.no_grad():
        for ids in prompts:
            tiny_llama(input_ids=ids)
    for h in hooks:
        h.remove()
    for layer in range(2):
        stack = []
        for ids, q in zip(prompts, captured[layer]):
            n = ids.shape[1]
            q = q.view(1, n, 4, 16).transpose(1, 2)
            cos, sin = tiny_llama.model.rotary_emb(q, torch.arange(n)[None])
            q_post, _ = apply_rotary_pos_emb(q, q, cos, sin)
            stack.append(q_post[0])
        for kv in range(2):
            x = torch.cat([s[kv * 2:(kv + 1) * 2].reshape(-1, 16) for s in stack]).double().numpy()
            assert np.allclose(filters[layer, kv].double().numpy(), _ref_direction(x), atol=1e-4), (layer, kv)


def test_qfilter_packaged_smollm2_filters_predict_attention(smollm2, smol_passage):
    """The packaged filters have SmolLM2's shape and their sign is the one that predicts attention: per layer
    and head, k . u correlates positively with the attention the prompt's queries give (mean over layers)."""
    from kvpolicy.policy import Budget, Policy
    from kvpolicy.registry import get_registry
    from kvpolicy_presses.qfilter import QFilter, load_qfilters

    table = load_qfilters("smollm2")
    assert table.shape == (30, 3, 64)
    corr: list[float] = []

    class Probe(QFilter):
        name = "test-qfilter-probe"

        def score(self, ctx):
            s = super().score(ctx)
            acc = ctx.accumulated_attention()
            for j in range(ctx.shape[1]):
                a, b = s[0, j, 4:].double(), acc[0, j, 4:].double().log()
                corr.append(float(torch.corrcoef(torch.stack([a, b]))[0, 1]))
            return s

    reg = get_registry()
    policy = Policy(name="probe", budget=Budget(ratio=0.5, sink=4), scorer=Probe(filters="smollm2"),
                    selector=reg.component("selector", "topk")(), merger=reg.component("merger", "none")(),
                    decode=reg.component("decode", "none")(), schedule=reg.component("schedule", "uniform")())
    model, _ = smollm2
    with torch.inference_mode(), kvpolicy.compress(model, policy) as cache:
        model(input_ids=smol_passage[:, :400], cache=cache)
    assert len(corr) == 90 and sum(corr) / len(corr) > 0.1


@pytest.mark.parametrize("scorer", [{"name": "criticalkv", "base": {"name": "tova"}},
                                    {"name": "criticalkv", "base": {"name": "accumulated-attention"},
                                     "first_stage_ratio": 0.0},
                                    {"name": "qfilter"}])
def test_criticalkv_and_qfilter_keep_the_invariants(scorer):
    kit.check_policy({"budget": {"ratio": 0.5, "sink": 1}, "scorer": scorer}, model=False)
