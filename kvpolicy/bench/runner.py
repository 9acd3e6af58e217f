"""The quality harness: compress a real context once per (policy, budget, sample), then score branches.

For each sample (see :mod:`kvpolicy.bench.tasks`) the uncompressed reference runs first (preset ``full``,
kvpolicy's no-op path): it gives the greedy tokens that fidelity compares against and, for the attention
mass, the queries of the continuation tokens and the full keys. Then every policy × budget prefills the
same context inside ``kvpolicy.compress``; the cache state right after the prefill is snapshotted and
restored before each branch (continuation, copy, fidelity, one per passkey needle), so one prefill
serves every metric. Tokens after the context are fed one at a time, with their true positions.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from kvpolicy import observe
from kvpolicy.bench import metrics as M
from kvpolicy.bench.tasks import make_samples
from kvpolicy.cache import KVPolicyCache
from kvpolicy.config import load_policy
from kvpolicy.integrate import compress

QUALITY_METRICS = ("continuation", "copy", "fidelity", "passkey", "mass")
ALL_METRICS = QUALITY_METRICS + ("speed", "rss")
DEFAULT_POLICIES = ("streaming", "h2o", "snapkv", "tova", "knorm", "pyramidkv", "random")
REFERENCE = "full"


@dataclass
class BenchConfig:
    """What ``kvpolicy bench`` runs. Context lengths are in tokens; budgets are ratios in (0, 1]."""

    policies: list[str] = field(default_factory=lambda: list(DEFAULT_POLICIES))
    budgets: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.5])
    contexts: list[int] = field(default_factory=lambda: [2000])
    samples: int = 1
    metrics: list[str] = field(default_factory=lambda: [m for m in ALL_METRICS if m != "rss"])
    seed: int = 0
    continuation: int = 48
    span: int = 48
    cue: int = 8
    gen_tokens: int = 24
    depths: tuple[float, ...] = (0.25, 0.75)
    decode_tokens: int = 32  # for the isolated speed/RSS measurement
    threads: int | None = None  # torch CPU threads (None: torch's default)

    def check(self) -> None:
        bad = sorted(set(self.metrics) - set(ALL_METRICS))
        if bad:
            raise ValueError(f"unknown metric(s) {bad}; allowed: {', '.join(ALL_METRICS)}")
        for b in self.budgets:
            if not 0 < b <= 1:
                raise ValueError(f"budget {b}: allowed ratios are in (0, 1]")
        for n in self.contexts:
            if n < 4 * self.span:
                raise ValueError(f"context length {n}: allowed >= {4 * self.span} (4 × the copy span)")
        if self.samples < 1:
            raise ValueError(f"samples={self.samples}: allowed >= 1")


# --------------------------------------------------------------------------------------------- cache forks
def snapshot(cache: KVPolicyCache) -> dict[str, Any]:
    """The cache's state, to restore after a branch (:meth:`KVPolicyCache.checkpoint`)."""
    return cache.checkpoint()


def restore(cache: KVPolicyCache, snap: dict[str, Any]) -> None:
    cache.rollback(snap)


class Recorder:
    """Records what the reference run's attention saw, by wrapping the cache's ``after_attention``.

    kvpolicy's attention function calls ``cache.after_attention(layer_idx, query, scaling)`` with the
    post-RoPE query ``[B, H, q, D]`` right after the layer's attention. For the prefill (``q > 1``) this
    keeps the queries, keys and values of every layer (so other policies can :func:`replay` the prefill
    instead of recomputing it); for one-token forwards while ``active``, the query and the new key
    (the last entry, ``[B, Hkv, 1, D]``), for the attention mass.
    """

    def __init__(self, cache: KVPolicyCache, *, prefill: bool, decode: bool) -> None:
        self.active = False
        self.prefill: dict[int, tuple[Tensor, Tensor, Tensor, float]] = {}
        self.queries: dict[int, list[Tensor]] = {}
        self.keys: dict[int, list[Tensor]] = {}
        inner = cache.after_attention

        def after_attention(layer_idx: int, query: Tensor, scaling: float) -> None:
            layer = cache.layers[layer_idx]
            if prefill and query.shape[2] > 1:
                self.prefill[layer_idx] = (layer.keys, layer.values, query.detach().clone(), scaling)
            elif decode and self.active and query.shape[2] == 1:
                self.queries.setdefault(layer_idx, []).append(query.detach().float().clone())
                self.keys.setdefault(layer_idx, []).append(layer.keys[:, :, -1:].detach().float().clone())
            inner(layer_idx, query, scaling)

        cache.after_attention = after_attention  # type: ignore[method-assign]


def can_replay(cache: KVPolicyCache) -> bool:
    """A recorded prefill can stand in for the model's unless the policy re-reads its context."""
    plan = getattr(cache.policy, "reconstruction", None)
    return plan is None or plan() is None


def replay(cache: KVPolicyCache, prefill: dict[int, tuple[Tensor, Tensor, Tensor, float]]) -> None:
    """Feed a recorded prefill to a fresh cache exactly as the model's forward would.

    The prefill's outputs do not depend on the policy (each layer is compressed only after its own
    attention), so the cache calls are all that differ: ``begin_forward`` (the model pre-hook), then per
    layer ``update`` (the attention module), ``fused_prefill_attention`` and ``after_attention`` (kvpolicy's
    attention function).
    """
    q_len = prefill[0][0].shape[2]
    cache.begin_forward(q_len, None, None)
    was = getattr(cache, "in_forward", False)
    cache.in_forward = True  # what the model hooks of kvpolicy.compress() set around a forward
    try:
        for layer_idx in range(len(cache.layers)):
            keys, values, query, scaling = prefill[layer_idx]
            cache.update(keys, values, layer_idx)
            # the statistics the attention pass leaves for the compression (the exact column sums, or the
            # queries' log-sum-exp an estimate reads), as kvpolicy's attention function computes them
            cache.fused_prefill_attention(layer_idx, query, scaling)
            cache.after_attention(layer_idx, query, scaling)
    finally:
        cache.in_forward = was


def kept_positions(cache: KVPolicyCache, n_ctx: int) -> list[Tensor]:
    """Per layer, ``[B, Hkv, n_ctx]`` bool: which context positions have an entry in the cache now."""
    out = []
    for layer in cache.layers:
        b, h, _ = layer.positions.shape
        pos = layer.positions.cpu()
        ok = layer.valid.cpu() & (pos < n_ctx)
        mask = torch.zeros(b, h, n_ctx + 1, dtype=torch.bool)  # the extra column takes the non-kept entries
        mask.scatter_(-1, torch.where(ok, pos, n_ctx), True)
        out.append(mask[..., :n_ctx])
    return out


def attention_mass_retained(reference: dict[str, Any], kept: list[Tensor]) -> float:
    """Share of the full cache's attention (continuation queries) that falls on entries a policy kept.

    ``reference`` holds, per layer, the queries ``[B, H, T, D]`` of the continuation tokens, the full keys
    ``[B, Hkv, n_ctx + T, D]`` and the softmax scale. Tokens after the context always count as kept.
    Computed with :func:`kvpolicy.observe.attention_colsum` (query chunks; no ``L × L`` buffer).
    Returns the mean over the compressed layers of the retained share (every head and query weighted equally);
    the attention is the model's own form (soft-capping, sinks), and sliding-window layers, which the policy
    leaves as windows, are not counted.
    """
    shares = []
    n_ctx = reference["n_ctx"]
    forms = reference.get("forms") or [observe.PLAIN] * len(kept)
    for layer_idx, mask in enumerate(kept):
        if forms[layer_idx].window is not None:
            continue
        q, k, scaling = reference["queries"][layer_idx], reference["keys"][layer_idx], reference["scaling"][layer_idx]
        b, _, t, _ = q.shape
        s = k.shape[2]
        qpos = torch.arange(n_ctx, n_ctx + t).expand(b, t)
        kpos = torch.arange(s).expand(b, k.shape[1], s)
        col = observe.attention_colsum(q, k, scaling=scaling, query_pos=qpos, key_pos=kpos,
                                       form=forms[layer_idx])  # [B, Hkv, S]
        keep = torch.cat([mask, torch.ones(b, k.shape[1], s - n_ctx, dtype=torch.bool)], dim=-1)
        shares.append(float((col * keep).sum() / col.sum()))
    return M.mean(shares)


# --------------------------------------------------------------------------------------------- one run
def policy_for(name: str, budget: float | None) -> Any:
    return load_policy(name) if name == REFERENCE or budget is None else load_policy(name, budget=budget)


def _compress(model: Any, policy: Any, tok: Any) -> Any:
    if "tokenizer" in inspect.signature(compress).parameters:
        return compress(model, policy, tokenizer=tok)
    return compress(model, policy)


def run_one(model: Any, tok: Any, name: str, budget: float | None, sample: dict[str, Any], metrics: set[str],
            *, reference: dict[str, Any] | None = None, record: bool = False,
            on_branch: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Prefill ``sample['context']`` with policy ``name`` at ``budget``, run the branches, return a result row.

    With ``record`` (the reference run) the row also holds ``_reference``: first logits, greedy tokens, the
    recorded prefill and, when ``mass`` is asked for, the continuation queries and full keys. Given a
    ``reference`` with a recorded prefill, the prefill is replayed (:func:`replay`) instead of recomputed.
    """
    policy = policy_for(name, budget)
    ids = torch.tensor([sample["context"]])
    n_ctx = ids.shape[1]
    stop = [t for t in [tok.eos_token_id] if t is not None]
    branch_metrics = set(metrics) & {"continuation", "copy", "fidelity", "passkey"}
    if record and "mass" in metrics:
        branch_metrics.add("continuation")
    with torch.inference_mode(), _compress(model, policy, tok) as cache:
        recorder = Recorder(cache, prefill=True, decode="mass" in metrics) if record else None
        replayed = reference is not None and "prefill" in reference and can_replay(cache)
        t0 = time.perf_counter()
        if replayed:
            replay(cache, reference["prefill"])
            first = reference["first_logits"]
        else:
            first = model(input_ids=ids, cache=cache, logits_to_keep=1).logits[0, -1].float()
        prefill_s = time.perf_counter() - t0
        report = cache.report()
        kept = kept_positions(cache, n_ctx) if "mass" in metrics and not record else None
        snap = snapshot(cache)

        def step(t: int) -> Tensor:
            return model(input_ids=torch.tensor([[t]]), cache=cache, logits_to_keep=1).logits[0, -1].float()

        def branch(bname: str) -> None:
            if recorder is not None:
                recorder.active = bname == "continuation"
            if on_branch is not None:
                on_branch(bname)

        raw = M.run_branches(sample, first, step, lambda: restore(cache, snap), lambda x: tok.decode(x),
                             branch_metrics, stop, on_branch=branch)
    row: dict[str, Any] = {"policy": name, "budget": 1.0 if name == REFERENCE or budget is None else budget,
                           "context": n_ctx, "seed": sample["seed"], "book": sample.get("book", "")}
    row.update(M.summarize(raw, reference))
    if "passkey_texts" in raw:
        row["passkey_answers"] = " | ".join(t.strip().replace("\n", " ")[:24] for t in raw["passkey_texts"])
    if "mass" in metrics:
        row["attention_mass"] = 1.0 if record or kept is None else attention_mass_retained(reference, kept)
    # a replayed prefill has no prefill time of its own (kvpolicy's compression time is still measured)
    row.update({"prefill_s": float("nan") if replayed else prefill_s, "compress_s": report.seconds,
                "kv_bytes": report.bytes_now, "kv_bytes_full": report.bytes_full,
                "kv_ratio": report.bytes_now / max(1, report.bytes_full), "replayed_prefill": replayed})
    if recorder is not None:
        n_layers = len(recorder.prefill)
        ref: dict[str, Any] = {"greedy": raw.get("greedy"), "n_ctx": n_ctx, "first_logits": first,
                               "prefill": recorder.prefill, "scaling": [recorder.prefill[i][3] for i in range(n_layers)],
                               "forms": [layer.form for layer in cache.layers]}
        if recorder.queries:
            ref["queries"] = [torch.cat(recorder.queries[i], dim=2) for i in range(n_layers)]
            ref["keys"] = [torch.cat([recorder.prefill[i][0].float()] + recorder.keys[i], dim=2)
                           for i in range(n_layers)]
        row["_reference"] = ref
    return row


# --------------------------------------------------------------------------------------------- the sweep
def expand_policies(names: list[str]) -> list[str]:
    """``all`` -> every registered preset except the reference; otherwise the names, checked."""
    from kvpolicy.registry import get_registry

    reg = get_registry()
    known = sorted(reg.presets)
    if names == ["all"]:
        return [n for n in known if n != REFERENCE]
    out = []
    for n in names:
        if n == REFERENCE:
            continue
        if n not in known and not n.endswith((".yaml", ".yml", ".json", ".toml")):
            raise ValueError(f"unknown policy {n!r}; allowed: a config file or one of {', '.join(known)} (or 'all')")
        out.append(n)
    return out


def run_quality(model: Any, tok: Any, cfg: BenchConfig, *, books: dict[str, str] | None = None,
                progress: Callable[[str, int], None] | None = None,
                on_row: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """All (sample, policy, budget) runs; returns one row per run (the reference row per sample included).

    ``progress(description, total)`` is called before each run (``total`` = number of runs);
    ``on_row(row)`` after each (e.g. to write partial results).
    """
    cfg.check()
    metrics = set(cfg.metrics)
    policies = expand_policies(cfg.policies)
    samples = make_samples(tok, cfg.contexts, cfg.samples, seed=cfg.seed, depths=tuple(cfg.depths),
                           continuation=cfg.continuation, span=cfg.span, cue=cfg.cue, gen_tokens=cfg.gen_tokens,
                           books=books)
    total = len(samples) * (1 + len(policies) * len(cfg.budgets))
    rows: list[dict[str, Any]] = []
    for sample in samples:
        tag = f"{sample['n_ctx']} tok, seed {sample['seed']}"
        if progress:
            progress(f"{REFERENCE} ({tag})", total)
        ref_row = run_one(model, tok, REFERENCE, None, sample, metrics, record=True)
        reference = ref_row.pop("_reference")
        reference_summary = ref_row
        rows.append(ref_row)
        if on_row:
            on_row(ref_row)
        for name in policies:
            for budget in cfg.budgets:
                if progress:
                    progress(f"{name} @ {budget} ({tag})", total)
                row = run_one(model, tok, name, budget, sample, metrics, reference=reference)
                for key in ("continuation_nll", "copy_nll"):
                    if key in row and key in reference_summary:
                        row[f"{key}_vs_full"] = row[key] - reference_summary[key]
                rows.append(row)
                if on_row:
                    on_row(row)
        del reference
    return rows
