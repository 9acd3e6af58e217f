"""Cost of the step-output contract (kvpolicy.contract) next to one layer's compression (SnapKV, 2000 tokens).

Usage: ``python benchmarks/bench_contract.py`` (one thread; best of 20 runs each).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

import kvpolicy
from kvpolicy import contract
from kvpolicy.policy import CompressionContext

B, HKV, GROUP, S, D = 1, 3, 3, 2000, 64  # SmolLM2's layer shape at a 2000-token prompt


def best(fn: Callable[[], object], n: int = 20) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    keys, values = torch.randn(B, HKV, S, D), torch.randn(B, HKV, S, D)
    queries = torch.randn(B, HKV * GROUP, S, D)
    policy = kvpolicy.load_policy("snapkv", budget=0.2)

    def ctx() -> CompressionContext:
        return CompressionContext(
            layer_idx=0, n_layers=30, phase="prefill", keys=keys, values=values,
            positions=torch.arange(S).expand(B, HKV, S), valid=torch.ones(B, HKV, S, dtype=torch.bool),
            is_image=torch.zeros(B, HKV, S, dtype=torch.bool),
            budget=policy.layer_budget(0, 30, torch.tensor([S])), scaling=D ** -0.5, queries=queries,
            query_pos=torch.arange(S).expand(B, S), query_valid=torch.ones(B, S, dtype=torch.bool))

    c = ctx()
    sel, merged = policy.compress(c)
    scores = policy.scorer.score(c)
    step = best(lambda: policy.compress(ctx()))
    parts = {"scores": lambda: contract.check_scores(policy.scorer, c, scores),
             "selection": lambda: contract.check_selection(policy.selector, c, sel),
             "merged": lambda: contract.check_merged(policy.merger, c, sel, merged)}
    cost = {name: best(fn) for name, fn in parts.items()}
    total = sum(cost.values())
    print(f"snapkv compression step, one layer ({S} tokens, {HKV} KV heads): {step * 1e3:.2f} ms "
          f"(contract checks included)")
    print(f"contract checks: {total * 1e3:.3f} ms ({total / step:.1%} of the step): "
          + ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in cost.items()))


if __name__ == "__main__":
    main()
