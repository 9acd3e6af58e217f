"""Prefill cost breakdown of merging presets on the embedded SmolLM2, robust to a loaded machine.

One torch thread, so the process CPU time is the work done whatever else runs on the machine. For plain
transformers and for each preset: the prefill CPU time, and inside it the accumulated-attention observation
(``kvpolicy.observe.attention_colsum``), the method's own steps (``selector.select`` + ``merger.merge``)
and the cache update (``KVPolicyLayer.apply``); plus the sampled peak RSS growth during the prefill
(``prefill_peak_delta_mb``, KV cache and working memory)::

    python -m kvpolicy_kvmerger.bench 2000 kvmerger elastic-cache kvmerger-exact
"""

from __future__ import annotations

import json
import sys
import time

import torch


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    from transformers import DynamicCache

    import kvpolicy
    from kvpolicy import cache as cache_mod
    from kvpolicy import models
    from kvpolicy import policy as policy_mod
    from kvpolicy.bench.speed import PeakSampler, context_ids, rss_bytes, timed, trim_memory

    n, presets = int(argv[0]), argv[1:]
    model, tok = models.load_default()
    ids = torch.tensor([context_ids(tok, n, 0)])
    spent: dict[str, float] = {}
    policy_mod.observe.attention_colsum = timed(policy_mod.observe.attention_colsum, "colsum_s", spent)
    cache_mod.KVPolicyLayer.apply = timed(cache_mod.KVPolicyLayer.apply, "apply_s", spent)
    with torch.inference_mode():
        model(input_ids=ids[:, :64], past_key_values=DynamicCache())  # warm-up
        for name in ["plain", *presets]:
            spent.clear()
            trim_memory()
            before = rss_bytes()
            t, wall = time.process_time(), time.perf_counter()
            with PeakSampler() as sampler:
                if name == "plain":
                    model(input_ids=ids, past_key_values=DynamicCache())
                else:
                    policy = kvpolicy.load_policy(name, budget=0.2)
                    for step, meth in ((policy.selector, "select"), (policy.merger, "merge")):
                        object.__setattr__(step, meth, timed(getattr(step, meth), f"{meth}_s", spent))
                    with kvpolicy.compress(model, policy) as cache:
                        model(input_ids=ids, cache=cache)
            row = {"policy": name, "n": n, "prefill_cpu_s": round(time.process_time() - t, 2),
                   "wall_s": round(time.perf_counter() - wall, 1),
                   "prefill_peak_delta_mb": round((sampler.peak - before) / 2**20, 1),
                   **{k: round(v, 3) for k, v in spent.items()}}
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
