"""Decode time per token, ours against kvpress's, side by side: plain, SnapKV 0.2 and H2O 0.2 at 2k and 8k.

Two halves, because kvpress pins an older transformers and lives in its own virtualenv
(``bash benchmarks/kvpress_env.sh --setup-only`` creates ``.venv-kvpress``):

    python benchmarks/decode_kvpress.py ours --out /tmp/dec                  # kvpolicy env: the prompts + ours
    .venv-kvpress/bin/python benchmarks/decode_kvpress.py kvpress --out /tmp/dec   # kvpress's rows
    python benchmarks/decode_kvpress.py table --out /tmp/dec                 # the table

``--rows snapkv h2o --no-limit`` times only those rows (e.g. to alternate the two halves on a noisy machine).

Each row: one prefill of the prompt (Austen text, the first N tokens), then ``--new`` greedy decode steps
timed one by one (``time.perf_counter`` around each forward), ``--threads`` torch threads (1); the median ms per
token. Ours also times plain decoding over the first K = 0.2 N tokens (the issue's limit: a cache of K entries
should decode within 1.1x of that), and both halves time transformers' own ``DynamicCache`` over those K tokens
in their environment: the two transformers releases' decoding over the same short context, with no policy.
The prompt ids are written by the ``ours`` half and read by the ``kvpress`` half, so both decode over the
same context. kvpress's H2O is ``ObservedAttentionPress`` (it needs eager attention, which it sets); ours is
the ``h2o`` preset. kvpress decodes with explicit ``position_ids`` (its cache is shorter than the sequence).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

MODEL = Path(os.environ.get("KVPOLICY_CACHE", Path.home() / ".cache" / "kvpolicy")) / "smollm2-135m-instruct"
ROWS = (("plain", 1.0), ("snapkv", 0.2), ("h2o", 0.2))
KEPT = 0.2  # the compressed rows' budget: "plain over K" decodes over the first K = KEPT * N tokens


def _time_steps(step, first: torch.Tensor, new: int) -> float:  # noqa: ANN001
    nxt, times = first, []
    for _ in range(new):
        t0 = time.perf_counter()
        nxt = step(nxt)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _dynamic_over(model, ids: torch.Tensor, new: int) -> float:  # noqa: ANN001
    """ms/token of transformers' own ``DynamicCache`` decoding after a prefill of ``ids`` (the environment's
    transformers release: 5.24 in ours, kvpress's pinned one in its venv)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.inference_mode():
        first = model(input_ids=ids, past_key_values=cache, logits_to_keep=1).logits[:, -1:].argmax(-1)
        return _time_steps(lambda t: model(input_ids=t, past_key_values=cache).logits[:, -1:].argmax(-1), first, new)


def ours(out: Path, lengths: list[int], new: int, rows_wanted: tuple[tuple[str, float], ...] = ROWS,
         limit: bool = True) -> None:
    import kvpolicy
    from kvpolicy import data

    model, tok = kvpolicy.models.load_default()
    text = data.austen_text("Pride & Prejudice")
    rows = []
    for n in lengths:
        ids = tok(text, add_special_tokens=False)["input_ids"][:n]
        (out / f"prompt_{n}.json").write_text(json.dumps(ids))
        x = torch.tensor([ids])
        for name, budget in rows_wanted:
            policy = kvpolicy.load_policy("full" if name == "plain" else name, **({} if name == "plain" else
                                                                                   {"budget": budget}))
            with torch.inference_mode(), kvpolicy.compress(model, policy) as cache:
                first = model(input_ids=x, cache=cache, logits_to_keep=1).logits[:, -1:].argmax(-1)
                ms = _time_steps(lambda t: model(input_ids=t, cache=cache).logits[:, -1:].argmax(-1), first, new)
            rows.append({"side": "kvpolicy", "policy": name, "budget": budget, "tokens": n, "ms_per_token": round(ms, 2)})
            print(json.dumps(rows[-1]), flush=True)
        if not limit:
            continue
        # the limit: plain decoding over a context of the K entries a compressed cache holds
        k = int(n * KEPT)
        with torch.inference_mode(), kvpolicy.compress(model, "full") as cache:
            first = model(input_ids=x[:, :k], cache=cache, logits_to_keep=1).logits[:, -1:].argmax(-1)
            ms = _time_steps(lambda t: model(input_ids=t, cache=cache).logits[:, -1:].argmax(-1), first, new)
        rows.append({"side": "kvpolicy", "policy": "plain-K", "budget": 1.0, "tokens": n, "kept": k,
                     "ms_per_token": round(ms, 2)})
        print(json.dumps(rows[-1]), flush=True)
        rows.append({"side": "kvpolicy", "policy": "dynamic-K", "budget": 1.0, "tokens": n, "kept": k,
                     "ms_per_token": round(_dynamic_over(model, x[:, :k], new), 2)})
        print(json.dumps(rows[-1]), flush=True)
    (out / "ours.json").write_text(json.dumps(rows, indent=1))


def kvpress_side(out: Path, lengths: list[int], new: int, rows_wanted: tuple[tuple[str, float], ...] = ROWS,
                 limit: bool = True) -> None:
    import kvpress
    from transformers import AutoModelForCausalLM, DynamicCache

    rows = []
    for n in lengths:
        ids = torch.tensor([json.loads((out / f"prompt_{n}.json").read_text())])
        for name, budget in rows_wanted:
            attn = "eager" if name == "h2o" else "sdpa"
            model = AutoModelForCausalLM.from_pretrained(MODEL, torch_dtype=torch.float32, attn_implementation=attn)
            press = {"plain": None, "snapkv": lambda: kvpress.SnapKVPress(compression_ratio=1 - budget),
                     "h2o": lambda: kvpress.ObservedAttentionPress(compression_ratio=1 - budget)}[name]
            cache = DynamicCache()
            with torch.inference_mode():
                if press is None:
                    hidden = model.model(input_ids=ids, past_key_values=cache).last_hidden_state
                else:
                    with press()(model):
                        hidden = model.model(input_ids=ids, past_key_values=cache).last_hidden_state
                first = model.lm_head(hidden[:, -1:]).argmax(-1)
                pos = [n]

                def step(t: torch.Tensor) -> torch.Tensor:
                    o = model(input_ids=t, past_key_values=cache, position_ids=torch.tensor([[pos[0]]]))
                    pos[0] += 1
                    return o.logits[:, -1:].argmax(-1)

                ms = _time_steps(step, first, new)
            rows.append({"side": "kvpress", "policy": name, "budget": budget, "tokens": n, "ms_per_token": round(ms, 2)})
            print(json.dumps(rows[-1]), flush=True)
        if not limit:
            continue
        # the same limit in kvpress's environment: its transformers' DynamicCache over the first K tokens
        k = int(n * KEPT)
        model = AutoModelForCausalLM.from_pretrained(MODEL, torch_dtype=torch.float32, attn_implementation="sdpa")
        rows.append({"side": "kvpress", "policy": "dynamic-K", "budget": 1.0, "tokens": n, "kept": k,
                     "ms_per_token": round(_dynamic_over(model, ids[:, :k], new), 2)})
        print(json.dumps(rows[-1]), flush=True)
    (out / "kvpress.json").write_text(json.dumps(rows, indent=1))


def table(out: Path) -> None:
    rows = json.loads((out / "ours.json").read_text()) + json.loads((out / "kvpress.json").read_text())
    by = {(r["side"], r["policy"], r["tokens"]): r["ms_per_token"] for r in rows}
    print(f"| context | policy | kvpolicy ms/token | kvpress ms/token | kvpolicy / plain over K = {KEPT} N |")
    print("|---:|---|---:|---:|---:|")
    for n in sorted({r["tokens"] for r in rows}):
        ref = by.get(("kvpolicy", "plain-K", n))
        for name, budget in ROWS:
            label = name if name == "plain" else f"{name} {budget}"
            ours_ms = by.get(("kvpolicy", name, n))
            limit = f"{ours_ms / ref:.2f}x" if name != "plain" and ref and ours_ms else ""
            print(f"| {n} | {label} | {ours_ms or '-'} | {by.get(('kvpress', name, n), '-')} | {limit} |")
        if ref:
            print(f"| {n} | plain over {int(n * KEPT)} tokens | {ref} | | 1.00x |")
        dyn = (by.get(("kvpolicy", "dynamic-K", n)), by.get(("kvpress", "dynamic-K", n)))
        if any(dyn):
            print(f"| {n} | transformers' DynamicCache over {int(n * KEPT)} tokens (each environment's release) | "
                  f"{dyn[0] or '-'} | {dyn[1] or '-'} | |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("half", choices=["ours", "kvpress", "table"])
    ap.add_argument("--out", default="/tmp/kvpolicy-decode")
    ap.add_argument("--lengths", type=int, nargs="+", default=[2000, 8000])
    ap.add_argument("--new", type=int, default=24)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", nargs="+", choices=[name for name, _ in ROWS], default=[name for name, _ in ROWS],
                    help="the rows to time (default: all)")
    ap.add_argument("--limit", action=argparse.BooleanOptionalAction, default=True,
                    help="also time the limit rows (plain decoding and DynamicCache over K tokens)")
    a = ap.parse_args()
    rows = tuple(r for r in ROWS if r[0] in a.rows)
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.half == "ours":
        ours(out, a.lengths, a.new, rows, a.limit)
    elif a.half == "kvpress":
        kvpress_side(out, a.lengths, a.new, rows, a.limit)
    else:
        table(out)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
