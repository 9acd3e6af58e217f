"""Prefill time of the ``kvzip`` preset against a plain prefill (preset ``full``) on SmolLM2.

    flock /tmp/kvpolicy-bench.lock nice -n 10 python benchmarks/kvzip_cost.py --repeats 3

The context is ``kvpolicy bench``'s 2000-token sample (seed 0). Plain and ``kvzip`` prefills alternate
(so a change of machine load hits both), one torch thread; prints each time and the median ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import kvpolicy
from kvpolicy.bench.tasks import make_sample


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budget", type=float, default=0.2)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model, tok = kvpolicy.models.load_default()
    ids = torch.tensor([make_sample(tok, 2000, seed=0, depths=(0.5,), continuation=32, span=48, cue=8,
                                    gen_tokens=16)["context"]])
    times: dict[str, list[float]] = {"full": [], "kvzip": []}
    for _ in range(a.repeats):
        for name in times:
            policy = kvpolicy.load_policy(name) if name == "full" else kvpolicy.load_policy(name, budget=a.budget)
            with torch.inference_mode(), kvpolicy.compress(model, policy, tokenizer=tok) as cache:
                t0 = time.perf_counter()
                model(input_ids=ids, cache=cache, logits_to_keep=1)
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print({k: [round(x, 2) for x in v] for k, v in times.items()})
    print(f"{ids.shape[1]} tokens: plain {med['full']:.2f} s, kvzip {med['kvzip']:.2f} s, ratio {med['kvzip'] / med['full']:.2f}")


if __name__ == "__main__":
    main()
