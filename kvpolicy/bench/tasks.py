"""Benchmark samples built from real text: token ids only, so any runner (ours or a peer's) uses the same.

A sample of context length ``n``:

- ``context``: ``n`` token ids — a stretch of an Austen novel (seeded choice of book and offset) with one
  *needle* per depth planted at that share of the context ("The secret code of the blue door is 48213.");
- ``continuation``: the true next tokens of the book after the context;
- ``copy_span``: a span of the book's tokens from inside the context (not overlapping a needle), to be
  repeated after it; the first ``copy_cue`` tokens are the cue, the rest is scored;
- ``needles``: per needle, the question ids (fed after the context) and the answer digits.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from kvpolicy import data, models

DOORS = ("blue", "red", "green", "yellow", "white", "black", "silver", "golden")
NEEDLE = " The secret code of the {door} door is {key}. Remember it: the {door} door's code is {key}. "
QUESTION = "\n\nQuestion: what is the secret code of the {door} door?\nAnswer: the secret code of the {door} door is"


def _encode(tok: Any, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def book_tokens(tok: Any, n: int, rng: random.Random, books: dict[str, str] | None = None
                ) -> tuple[list[int], dict[str, Any]]:
    """``n`` consecutive tokens of a seeded random Austen novel, starting at a line start."""
    books = books if books is not None else data.austen_books()
    titles = sorted(books)
    for _ in range(20):
        title = rng.choice(titles)
        text = books[title]
        need_chars = n * 6 + 2000
        if len(text) <= need_chars + 1000:
            continue
        off = rng.randrange(1000, len(text) - need_chars)
        nl = text.find("\n", off)
        off = nl + 1 if 0 <= nl < off + 500 else off
        ids = _encode(tok, text[off:off + need_chars])
        if len(ids) >= n:
            return ids[:n], {"book": title, "offset_chars": off}
    raise ValueError(f"no Austen novel is long enough for {n} tokens; allowed: up to about 100000 tokens")


def make_sample(tok: Any, n_ctx: int, *, seed: int, depths: tuple[float, ...] = (0.1, 0.5, 0.9),
                continuation: int = 64, span: int = 64, cue: int = 8, gen_tokens: int = 32,
                answer_tokens: int = 8, books: dict[str, str] | None = None) -> dict[str, Any]:
    """One sample of context length ``n_ctx`` (see the module docstring); deterministic in ``seed``."""
    if n_ctx < 4 * span:
        raise ValueError(f"context length {n_ctx} is too short for a copy span of {span} tokens; allowed: >= {4 * span}")
    if not 0 < cue < span:
        raise ValueError(f"copy cue {cue} must be in (0, span={span})")
    if len(depths) > len(DOORS):
        raise ValueError(f"{len(depths)} needle depths; allowed: at most {len(DOORS)}")
    rng = random.Random(seed * 1_000_003 + n_ctx)
    needles = []
    for i, depth in enumerate(depths):
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"needle depth {depth}; allowed: a share of the context in [0, 1]")
        key = str(rng.randrange(10000, 100000))
        needles.append({"door": DOORS[i], "key": key, "depth": float(depth),
                        "ids": _encode(tok, NEEDLE.format(door=DOORS[i], key=key))})
    lead = models.leading_special(tok)
    n_book = n_ctx - len(lead) - sum(len(nd["ids"]) for nd in needles)
    book, meta = book_tokens(tok, n_book + continuation, rng, books)
    body, cont = book[:n_book], book[n_book:]
    # plant needles before the book token at their depth; offsets[i] = where book token i lands
    plan = sorted(((round(nd["depth"] * n_book), i) for i, nd in enumerate(needles)))
    ctx: list[int] = list(lead)
    offsets: list[int] = []
    j = 0
    for i in range(n_book + 1):
        while j < len(plan) and plan[j][0] == i:
            nd = needles[plan[j][1]]
            nd["position"] = len(ctx)
            ctx.extend(nd["ids"])
            j += 1
        if i < n_book:
            offsets.append(len(ctx))
            ctx.append(body[i])
    start = None
    for _ in range(200):
        s = rng.randrange(int(0.15 * n_book), int(0.85 * n_book) - span)
        if offsets[s + span - 1] - offsets[s] == span - 1:
            start = s
            break
    if start is None:
        raise ValueError("could not place a copy span between the needles; use a longer context or fewer depths")
    return {
        "n_ctx": n_ctx, "seed": seed, **meta,
        "context": ctx,
        "continuation": cont,
        "copy_span": body[start:start + span], "copy_cue": cue, "copy_start": offsets[start],
        "gen_tokens": gen_tokens, "answer_tokens": answer_tokens,
        "needles": [{"depth": nd["depth"], "answer": nd["key"], "position": nd["position"],
                     "question": _encode(tok, QUESTION.format(door=nd["door"]))} for nd in needles],
    }


def make_samples(tok: Any, contexts: list[int], samples: int, *, seed: int = 0, **kw: Any) -> list[dict[str, Any]]:
    """``samples`` samples per context length, seeds ``seed .. seed + samples - 1``."""
    return [make_sample(tok, n, seed=seed + s, **kw) for n in contexts for s in range(samples)]


def save_samples(samples: list[dict[str, Any]], path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(samples))
    return p


def load_samples(path: str | Path) -> list[dict[str, Any]]:
    return json.loads(Path(path).read_text())


def main(argv: list[str] | None = None) -> int:
    """``python -m kvpolicy.bench.tasks --out samples.json [--contexts 2000 ...]``: export samples for a peer."""
    import argparse

    from kvpolicy import models

    ap = argparse.ArgumentParser(prog="python -m kvpolicy.bench.tasks", description=main.__doc__)
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default=None)
    ap.add_argument("--contexts", nargs="+", type=int, default=[2000])
    ap.add_argument("--samples", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--continuation", type=int, default=48)
    ap.add_argument("--span", type=int, default=48)
    ap.add_argument("--cue", type=int, default=8)
    ap.add_argument("--gen-tokens", type=int, default=24)
    ap.add_argument("--depths", nargs="+", type=float, default=[0.25, 0.75])
    a = ap.parse_args(argv)
    if a.model:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(a.model, local_files_only=True)
    else:
        _, tok = models.load_default()
    samples = make_samples(tok, a.contexts, a.samples, seed=a.seed, depths=tuple(a.depths),
                           continuation=a.continuation, span=a.span, cue=a.cue, gen_tokens=a.gen_tokens)
    print(save_samples(samples, a.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
