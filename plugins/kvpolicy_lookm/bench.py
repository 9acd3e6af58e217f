"""Prefill cost of LOOK-M on the embedded SmolLM2: ``python -m kvpolicy_lookm.bench --tokens 2048``.

Times one prefill forward (``use_cache=True``) per mode, interleaving the modes over ``--repeat`` rounds
and reporting the minimum and the median (the CPU may be shared):

* ``plain``: transformers' own cache and attention, no kvpolicy;
* ``full``: the kvpolicy cache and attention function, nothing compressed (integration overhead);
* ``text-prior-h2o``: + accumulated-attention scores and the text-prior selection (no merge);
* ``lookm-pivot``: + the pivotal merge of the evicted entries.

The merge's own cost is ``lookm-pivot - text-prior-h2o``; the scoring's is ``text-prior-h2o - full``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import kvpolicy

MODES = ("plain", "full", "text-prior-h2o", "lookm-pivot")


def prompt_ids(tok, n: int) -> torch.Tensor:  # noqa: ANN001
    """``[1, n]`` ids of real text (Austen, repeated if needed)."""
    from kvpolicy import data

    text = data.austen_text("Pride & Prejudice")
    ids = tok(text[: 8 * n], add_special_tokens=False)["input_ids"]
    while len(ids) < n:
        ids = ids + ids
    return torch.tensor([ids[:n]])


def time_prefill(model, ids: torch.Tensor, mode: str, budget: float) -> tuple[float, float]:  # noqa: ANN001
    """Seconds of one prefill forward, and the compression seconds the cache reports."""
    with torch.inference_mode():
        if mode == "plain":
            t0 = time.perf_counter()
            model(input_ids=ids, use_cache=True)
            return time.perf_counter() - t0, 0.0
        policy = "full" if mode == "full" else kvpolicy.load_policy(mode, budget=budget)
        with kvpolicy.compress(model, policy) as cache:
            t0 = time.perf_counter()
            model(input_ids=ids, past_key_values=cache, use_cache=True)
            dt = time.perf_counter() - t0
        return dt, cache.report().seconds


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[2048])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--budget", type=float, default=0.2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = kvpolicy.models.load_default()
    print(f"torch threads {torch.get_num_threads()}, budget {args.budget}, repeat {args.repeat}")
    for n in args.tokens:
        ids = prompt_ids(tok, n)
        time_prefill(model, ids[:, :256], "lookm-pivot", args.budget)  # warm-up
        runs: dict[str, list[tuple[float, float]]] = {m: [] for m in MODES}
        for _ in range(args.repeat):
            for m in MODES:
                runs[m].append(time_prefill(model, ids, m, args.budget))
        base = min(t for t, _ in runs["plain"])
        print(f"\n{n} tokens: prefill seconds (min / median over {args.repeat}), overhead vs plain (min)")
        for m in MODES:
            ts = [t for t, _ in runs[m]]
            comp = min(c for _, c in runs[m])
            print(f"  {m:<16} {min(ts):8.3f} / {statistics.median(ts):8.3f}   {min(ts) / base - 1:+7.1%}"
                  f"   compression {comp:6.3f} s")
        merge = min(t for t, _ in runs["lookm-pivot"]) - min(t for t, _ in runs["text-prior-h2o"])
        print(f"  merge cost (lookm-pivot - text-prior-h2o): {merge:+.3f} s = {merge / base:+.1%} of plain")


if __name__ == "__main__":
    main()
