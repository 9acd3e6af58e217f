"""The exact accumulated-attention statistic against SDPA, one attention layer (issue 17).

For one SmolLM2-shaped layer (9 query heads, 3 KV heads, head dim 64, fp32, causal prefill of L tokens) it
times (medians of ``--repeats`` interleaved runs after one warm-up):

- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention(..., is_causal=True, enable_gqa=True)``, the
  attention a plain prefill runs (PyTorch's fused flash kernel on CPU);
- ``fused``: :func:`kvpolicy.observe.attention_with_colsum`, the attention output *and* the column sums of
  every query's softmax (what H2O, LOOK-M, Elastic Cache and KVMerger score with), in one pass;
- ``fused-all-heads``: the same with every KV head in each chunk (the code before :func:`kvpolicy.observe.kv_head_groups`
  split long layers into groups of KV heads), for the A/B in one process;
- ``colsum``: :func:`kvpolicy.observe.attention_colsum` alone (the statistic without the output);
- ``sdpa+lse``: the same kernel returning each query's log-sum-exp (what a ``-fast`` preset's prefill runs);
- ``cosine``: :func:`kvpolicy.ops.cosine_argmax` of the last 80 % of the keys against the first 20 % (the
  merge assignment of LOOK-M and KVMerger at budget 0.2);
- ``estimate S``: :func:`kvpolicy.observe.estimated_colsum` with stride S and that log-sum-exp (the
  ``-fast`` presets' statistic, S = 16).

    python benchmarks/fused_stat.py --contexts 2000 8000 32000 --threads 1 --out bench-results/fused_stat.json

``--chunk-kib`` sweeps :data:`kvpolicy.observe.STAT_CHUNK_BYTES` (the logits per chunk).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from kvpolicy import observe, ops
from kvpolicy.integrate import sdpa_with_lse


def interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each function, the functions run in turn within each repeat (after one warm-up of
    each), so drifts of a shared machine hit them alike; ``<name>/sdpa`` is the median of the per-repeat
    ratios to ``sdpa``."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    row = {name: statistics.median(ts) for name, ts in times.items()}
    for name, ts in times.items():
        if name != "sdpa":
            row[f"{name}/sdpa"] = statistics.median(t / s for t, s in zip(ts, times["sdpa"]))
    return row


def all_heads(fn: Callable[[], object]) -> object:
    """``fn()`` with every KV head in one group (the statistics as they were before the head groups)."""
    saved = observe.HEAD_GROUP_BYTES
    observe.HEAD_GROUP_BYTES = 1 << 62
    try:
        return fn()
    finally:
        observe.HEAD_GROUP_BYTES = saved


def measure(length: int, repeats: int, strides: list[int], heads: int = 9, kv_heads: int = 3, dim: int = 64,
            ) -> dict[str, float]:
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads, length, dim, generator=gen)
    k = torch.randn(1, kv_heads, length, dim, generator=gen)
    v = torch.randn(1, kv_heads, length, dim, generator=gen)
    pos = torch.arange(length)[None]
    kpos = pos[:, None].expand(1, kv_heads, length)
    scale = dim ** -0.5
    fns: dict[str, Callable[[], object]] = {
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
        "fused": lambda: observe.attention_with_colsum(q, k, v, scaling=scale, query_pos=pos, key_pos=kpos),
        "fused-all-heads": lambda: all_heads(lambda: observe.attention_with_colsum(
            q, k, v, scaling=scale, query_pos=pos, key_pos=kpos)),
        "colsum": lambda: observe.attention_colsum(q, k, scaling=scale, query_pos=pos, key_pos=kpos),
    }
    fns["sdpa+lse"] = lambda: sdpa_with_lse(q, k, v, None, scale, True)
    kept = length // 5  # LOOK-M's / KVMerger's assignment at budget 0.2: each evicted key to its nearest kept one
    fns["cosine"] = lambda: ops.cosine_argmax(k[:, :, kept:], k[:, :, :kept])
    _, lse = sdpa_with_lse(q, k, v, None, scale, True)
    for s in strides:  # the estimate of the -fast presets, with the log-sum-exp the prefill kernel returned
        fns[f"estimate{s}"] = (lambda s=s: observe.estimated_colsum(
            q, k, stride=s, scaling=scale, query_pos=pos, key_pos=kpos, lse=lse))
    return interleaved(fns, repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[2000, 8000])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--strides", type=int, nargs="*", default=[16])
    ap.add_argument("--chunk-kib", type=int, nargs="*", default=None,
                    help="logits per chunk to try (default: the library's STAT_CHUNK_BYTES)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    chunks = args.chunk_kib or [getattr(observe, "STAT_CHUNK_BYTES", 0) >> 10]
    rows = []
    for length in args.contexts:
        for kib in chunks:
            observe.STAT_CHUNK_BYTES = kib << 10
            row = {"context": length, "threads": args.threads, "chunk_kib": kib,
                   **measure(length, args.repeats, args.strides)}
            rows.append(row)
            figures = "  ".join(f"{k} {v * 1e3:.1f} ms" if "/" not in k else f"{k} {v:.2f}x"
                                for k, v in row.items() if isinstance(v, float))
            print(f"L={length} threads={args.threads} chunk={kib} KiB: {figures}", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"torch": torch.__version__, "machine": platform.processor() or platform.machine()}
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
