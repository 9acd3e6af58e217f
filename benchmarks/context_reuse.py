"""One context, many questions: the context's cost paid once (kvpolicy.CompressedContext) vs a fresh
compression per question, on SmolLM2.

    python benchmarks/context_reuse.py --tokens 2000 --questions 4 --policy snapkv --budget 0.2

Prints the context's prefill + compression time, each question's time, both totals, and whether every
answer equals the fresh compression's. One torch thread.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import kvpolicy
from kvpolicy import data

QUESTIONS = ["Who is speaking?", "What is the mood of the passage?", "Name one person mentioned.",
             "Where does the scene take place?", "What happens at the end?", "Summarise it in one sentence."]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--questions", type=int, default=4, choices=range(1, len(QUESTIONS) + 1))
    ap.add_argument("--policy", default="snapkv")
    ap.add_argument("--budget", type=float, default=0.2)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    a = ap.parse_args()
    torch.set_num_threads(1)
    model, tok = kvpolicy.models.load_default()
    context = data.austen_passage(tok, a.tokens)
    questions = QUESTIONS[:a.questions]
    t0 = time.perf_counter()
    with kvpolicy.CompressedContext(model, tok, context, a.policy, budget=a.budget) as ctx:
        once = [ctx.ask(q, max_new_tokens=a.max_new_tokens) for q in questions]
        context_s = ctx.prefill_seconds
    reuse_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    fresh = []
    for q in questions:
        with kvpolicy.CompressedContext(model, tok, context, a.policy, budget=a.budget) as c:
            fresh.append(c.ask(q, max_new_tokens=a.max_new_tokens))
    fresh_s = time.perf_counter() - t0
    print(json.dumps({"tokens": len(ctx.context_ids), "policy": a.policy, "budget": a.budget,
                      "questions": len(questions), "context_s": round(context_s, 2),
                      "question_s": [round(x.seconds, 2) for x in once], "once_total_s": round(reuse_s, 2),
                      "fresh_total_s": round(fresh_s, 2),
                      "answers_equal": all(x.tokens == y.tokens for x, y in zip(once, fresh))}))


if __name__ == "__main__":
    main()
