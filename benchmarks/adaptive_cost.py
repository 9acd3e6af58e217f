"""Prefill cost, KV peak and bytes held of the allocation modes on SmolLM2 (uniform, heads, layers).

    python benchmarks/adaptive_cost.py --contexts 2000 6000 --repeats 3 --out docs/results/adaptive_cost.json

The context is ``kvpolicy bench``'s sample (seed 0). For each policy and context: the prefill time (median
of ``--repeats``; the policies alternate within each repeat so a change of machine load hits them all),
the KV peak during the prefill (the largest sum of every layer's key/value bytes, sampled when a layer's new
entries arrive and after its compression: the compressed layers plus the one whole layer being computed;
activations excluded) and
the bytes held after it, each over the full cache's bytes. One torch thread.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import kvpolicy
from kvpolicy.bench.tasks import make_sample
from kvpolicy.cache import _kv_bytes

POLICIES = ("full", "snapkv", "adakv-snapkv", "snapkv-global", "h2o", "h2o-global", "kvzip-uniform", "kvzip")


def prefill(model, tok, policy, ids):  # noqa: ANN001, ANN201
    """One prefill: (seconds, KV peak bytes, bytes held, full bytes)."""
    peak = [0]
    with torch.inference_mode(), kvpolicy.compress(model, policy, tokenizer=tok) as cache:
        inner_update, inner_after = cache.update, cache.after_attention

        def held() -> None:
            peak[0] = max(peak[0], sum(_kv_bytes(la) for la in cache.layers if la.is_initialized))

        def update(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            out = inner_update(*args, **kwargs)
            held()  # the new layer whole, before its compression
            return out

        def after_attention(layer_idx, query, scaling):  # noqa: ANN001, ANN202
            inner_after(layer_idx, query, scaling)
            held()

        cache.update, cache.after_attention = update, after_attention
        t0 = time.perf_counter()
        model(input_ids=ids, cache=cache, logits_to_keep=1)
        seconds = time.perf_counter() - t0
        rep = cache.report()
    return seconds, peak[0], rep.bytes_now, rep.bytes_full


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[2000])
    ap.add_argument("--policies", nargs="+", default=list(POLICIES))
    ap.add_argument("--budget", type=float, default=0.2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    model, tok = kvpolicy.models.load_default()
    rows = []
    for n in a.contexts:
        ids = torch.tensor([make_sample(tok, n, seed=0, depths=(0.5,), continuation=32, span=48, cue=8,
                                        gen_tokens=16)["context"]])
        runs: dict[str, list[tuple[float, int, int, int]]] = {p: [] for p in a.policies}
        for _ in range(a.repeats):
            for name in a.policies:
                policy = kvpolicy.load_policy(name) if name == "full" else kvpolicy.load_policy(name, budget=a.budget)
                runs[name].append(prefill(model, tok, policy, ids))
        plain = statistics.median(r[0] for r in runs["full"]) if "full" in runs else None
        for name, rs in runs.items():
            sec = statistics.median(r[0] for r in rs)
            _, peak, held, full = rs[-1]
            row = {"policy": name, "tokens": ids.shape[1], "prefill_s": round(sec, 3),
                   "vs_plain": round(sec / plain, 3) if plain else None, "kv_peak": round(peak / full, 3),
                   "kv_held": round(held / full, 4), "times": [round(r[0], 3) for r in rs]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps({"budget": a.budget, "threads": 1, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
