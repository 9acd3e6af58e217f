"""The cache's own work per decode step: each ``KVPolicyCache`` / ``KVPolicyLayer`` method a decode step calls,
timed by a wrapper (process CPU time), summed over the steps and divided by them (CPU ms per step, all layers).

    python benchmarks/cache_step.py --tokens 400 --policy full          # 400 entries, uncompressed
    python benchmarks/cache_step.py --tokens 2000 --policy snapkv       # 2000 tokens compressed to 400

SmolLM2 (embedded), one prefill of the first N tokens of *Pride and Prejudice*, then ``--steps`` greedy decode
steps, ``--threads`` torch threads (1). The whole step's time is printed too; the parts are what kvpolicy adds
on top of the model (transformers' ``DynamicCache`` does the same work with one ``torch.cat`` per layer).
"""

from __future__ import annotations

import argparse
import json
import time
import torch

PARTS = (("KVPolicyCache", "begin_forward"), ("KVPolicyCache", "update"), ("KVPolicyCache", "_decode_step"),
         ("KVPolicyCache", "after_attention"), ("KVPolicyLayer", "append"), ("KVPolicyLayer", "_extend"),
         ("KVPolicyLayer", "attention_mask"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=400)
    ap.add_argument("--policy", default="full")
    ap.add_argument("--budget", type=float, default=0.2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    import kvpolicy
    from kvpolicy import cache as cmod
    from kvpolicy import data
    from kvpolicy.bench.speed import timed

    spent: dict[str, float] = {}

    for cls, name in PARTS:
        setattr(getattr(cmod, cls), name, timed(getattr(getattr(cmod, cls), name), name, spent))
    model, tok = kvpolicy.models.load_default()
    ids = torch.tensor([tok(data.austen_text("Pride & Prejudice"), add_special_tokens=False)["input_ids"][:a.tokens]])
    policy = kvpolicy.load_policy(a.policy, **({} if a.policy == "full" else {"budget": a.budget}))
    with torch.inference_mode(), kvpolicy.compress(model, policy) as cache:
        nxt = model(input_ids=ids, cache=cache, logits_to_keep=1).logits[:, -1:].argmax(-1)
        spent.clear()
        t0 = time.process_time()
        for _ in range(a.steps):
            nxt = model(input_ids=nxt, cache=cache).logits[:, -1:].argmax(-1)
        step = (time.process_time() - t0) / a.steps
    print(json.dumps({"tokens": a.tokens, "policy": a.policy, "step_ms": round(1e3 * step, 2),
                      **{f"{k}_ms": round(1e3 * v / a.steps, 3) for k, v in spent.items()}}))


if __name__ == "__main__":
    main()
