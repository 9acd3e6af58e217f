"""Gemma-3-270M prefill: plain transformers vs kvpolicy (budget 1.0 and a compressing policy), one process per run.

    python benchmarks/gemma3_prefill.py --contexts 8000 --policies plain full snapkv --threads 2

Each configuration runs in a fresh subprocess (so peak RSS is its own): one prefill of ``n`` Austen tokens
(``logits_to_keep=1``), its wall time, the time the cache spent compressing, the KV bytes held and the process's
peak RSS. Prints a Markdown table and writes JSON next to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def one(policy: str, n: int, threads: int) -> dict:
    import torch

    import kvpolicy
    from kvpolicy import data, models

    torch.set_num_threads(threads)
    model, tok = models.load_default("gemma3-270m")
    ids = tok(data.austen_text("Emma"), return_tensors="pt").input_ids[:, :n]
    row = {"policy": policy, "n": int(ids.shape[1]), "threads": threads}
    with torch.inference_mode():
        if policy == "plain":
            from transformers import DynamicCache

            cache = DynamicCache(config=model.config)
            t = time.perf_counter()
            model(input_ids=ids, past_key_values=cache, logits_to_keep=1)
            row["prefill_s"] = time.perf_counter() - t
            row["kv_bytes"] = sum(layer.keys.numel() * 2 * layer.keys.element_size() for layer in cache.layers)
        else:
            with kvpolicy.compress(model, policy, budget=0.2) as cache:
                t = time.perf_counter()
                model(input_ids=ids, cache=cache, logits_to_keep=1)
                row["prefill_s"] = time.perf_counter() - t
            rep = cache.report()
            row.update(kv_bytes=rep.bytes_now, compress_s=rep.seconds)
    row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[8000])
    ap.add_argument("--policies", nargs="+", default=["plain", "full", "snapkv"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench-results/gemma3-prefill.json")
    ap.add_argument("--one", nargs=2, metavar=("POLICY", "N"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(a.one[0], int(a.one[1]), a.threads)))
        return 0
    rows = []
    for n in a.contexts:
        for p in a.policies:
            out = subprocess.run([sys.executable, __file__, "--one", p, str(n), "--threads", str(a.threads)],
                                 capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(rows[-1], file=sys.stderr)
    print("| tokens | config | prefill s | compression s | KV held MiB | peak RSS MiB |\n|---:|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['n']} | {r['policy']} | {r['prefill_s']:.1f} | {r.get('compress_s', 0):.2f} | "
              f"{r['kv_bytes'] / 2**20:.1f} | {r['peak_rss_mb']:.0f} |")
    with open(a.out, "w") as f:
        json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
