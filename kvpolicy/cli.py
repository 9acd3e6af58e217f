"""The ``kvpolicy`` console script."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from kvpolicy.errors import KVPolicyError

DEMO_QUESTION = "What is the name of the young man who has taken Netherfield Park?"


def _budget(value: str) -> float | int:
    try:
        return int(value)
    except ValueError:
        return float(value)


_MODELS: dict[str | None, tuple[Any, Any]] = {}  # loaded once per process (in-process callers, tests)


def _load_model(path: str | None) -> tuple[Any, Any]:
    from kvpolicy import models

    if path not in _MODELS:
        _MODELS[path] = models.load(path) if path else models.load_default()
    return _MODELS[path]


def generate_answer(model: Any, tok: Any, context: str, question: str, policy: Any, max_new_tokens: int
                    ) -> tuple[str, Any, float]:
    """Chat-format ``context`` + ``question``, generate greedily with ``policy``; return text, report, seconds."""
    import torch

    from kvpolicy.integrate import compress

    messages = [{"role": "user", "content": f"{context}\n\n{question}"}]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = tok(prompt, return_tensors="pt", add_special_tokens=False)
    t0 = time.perf_counter()
    with torch.inference_mode(), compress(model, policy) as cache:
        out = model.generate(**inputs, cache=cache, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id or tok.eos_token_id)
    dt = time.perf_counter() - t0
    text = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return text.strip(), cache.report(), dt


def cmd_run(args: argparse.Namespace) -> int:
    from kvpolicy.config import load_policy

    overrides = {"budget": _budget(args.budget)} if args.budget is not None else {}
    policy = load_policy(args.policy, **overrides)
    context = Path(args.prompt_file).read_text(encoding="utf-8")
    model, tok = _load_model(args.model)
    answer, report, dt = generate_answer(model, tok, context, args.question or "", policy, args.max_new_tokens)
    print(f"policy: {policy.name} ({policy.budget.describe()})")
    print(f"answer: {answer}")
    print(report)
    print(f"generation took {dt:.1f} s")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from kvpolicy import data
    from kvpolicy.config import load_policy

    model, tok = _load_model(args.model)
    text = data.austen_text("Pride & Prejudice")
    start = text.index("Chapter 1") if "Chapter 1" in text else 0
    ids = tok(text[start:], add_special_tokens=False)["input_ids"][: args.tokens]
    context = tok.decode(ids)
    print(f"context: the first {len(ids)} tokens of Pride & Prejudice (Jane Austen, public domain)")
    print(f"question: {args.question}\n")
    for name in args.policies:
        policy = load_policy(name, budget=_budget(args.budget)) if name != "full" else load_policy("full")
        answer, report, dt = generate_answer(model, tok, context, args.question, policy, args.max_new_tokens)
        print(f"=== {name} ({policy.budget.describe()}): {answer!r}  [{dt:.1f} s]")
        if name != "full" or args.verbose:
            print(report)
        print()
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from kvpolicy.registry import get_registry

    reg = get_registry()
    rows = [(r.kind, r.name, f"{r.distribution} {r.version}".strip(), r.description) for r in reg.rows()]
    if args.json:
        print(json.dumps([dict(zip(("kind", "name", "distribution", "description"), r)) for r in rows], indent=2))
        return 0
    w = [max(len(r[i]) for r in rows + [("kind", "name", "distribution", "")]) for i in range(3)]
    print(f"{'kind':<{w[0]}}  {'name':<{w[1]}}  {'distribution':<{w[2]}}  description")
    for r in rows:
        print(f"{r[0]:<{w[0]}}  {r[1]:<{w[1]}}  {r[2]:<{w[2]}}  {r[3]}")
    for name, msg in reg.failed.items():
        print(f"FAILED {name}: {msg}", file=sys.stderr)
    for name, off in reg.disabled.items():
        print(f"DISABLED {name} (distribution {off.distribution})", file=sys.stderr)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from kvpolicy.config import load_config

    try:
        cfg = load_config(args.file)
    except KVPolicyError as err:
        print(f"invalid: {args.file}", file=sys.stderr)
        for problem in str(err).splitlines():  # one problem per line: field path, value, what is allowed
            print(f"  {problem}", file=sys.stderr)
        return 1
    print(f"ok: {args.file} -> policy {cfg.name!r}")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from kvpolicy.config import policy_schema

    print(json.dumps(policy_schema(), indent=2))
    return 0


def cmd_trace_summary(args: argparse.Namespace) -> int:
    from kvpolicy.tracing import render_trace_summary

    print(render_trace_summary(args.file))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from kvpolicy.bench.cli import run_from_args

    return run_from_args(args)


def _add_trace(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace", default=None, metavar="console|jsonl:PATH|otlp[:URL]",
                   help="export OpenTelemetry spans and metrics (needs kvpolicy[trace]; otlp needs kvpolicy[otlp])")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="kvpolicy", description="KV-cache compression policies for transformers")
    sub = ap.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="generate with a compressed cache and print the answer and the cache report")
    run.add_argument("--policy", required=True, help="preset name or YAML/JSON/TOML file")
    run.add_argument("--prompt-file", required=True, help="text file with the context")
    run.add_argument("--question", default=None, help="question appended after the context")
    run.add_argument("--budget", default=None, help="ratio (0.2) or token count (512)")
    run.add_argument("--model", default=None, help="local transformers model directory (default: embedded SmolLM2)")
    run.add_argument("--max-new-tokens", type=int, default=64)
    _add_trace(run)
    run.set_defaults(func=cmd_run)

    demo = sub.add_parser("demo", help="answer a question about a real Austen chapter with compressed caches")
    demo.add_argument("--policies", nargs="+", default=["full", "snapkv", "h2o", "streaming"])
    demo.add_argument("--budget", default="0.35",
                      help="ratio or token count (0.35: the smallest of 0.2/0.3/0.35 at which SnapKV still answers "
                           "the default question correctly)")
    demo.add_argument("--tokens", type=int, default=2500, help="context length in tokens")
    demo.add_argument("--question", default=DEMO_QUESTION)
    demo.add_argument("--model", default=None)
    demo.add_argument("--max-new-tokens", type=int, default=24)
    demo.add_argument("--verbose", action="store_true")
    _add_trace(demo)
    demo.set_defaults(func=cmd_demo)

    plugins = sub.add_parser("plugins", help="list registered components and presets")
    plugins.add_argument("--json", action="store_true")
    plugins.set_defaults(func=cmd_plugins)

    val = sub.add_parser("validate", help="validate a policy config file")
    val.add_argument("file")
    val.set_defaults(func=cmd_validate)

    schema = sub.add_parser("schema", help="print the JSON Schema of policy configs")
    schema.set_defaults(func=cmd_schema)

    tsum = sub.add_parser("trace-summary", help="render a saved --trace jsonl:PATH trace as the per-layer table")
    tsum.add_argument("file")
    tsum.set_defaults(func=cmd_trace_summary)

    from kvpolicy.bench.cli import add_arguments as add_bench_arguments

    bench = sub.add_parser("bench", help="quality and speed of policies on real text: table, CSV/JSON, plots")
    add_bench_arguments(bench)
    _add_trace(bench)
    bench.set_defaults(func=cmd_bench)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "trace", None):
            from kvpolicy import telemetry_setup

            with telemetry_setup.setup(args.trace):
                return int(args.func(args) or 0)
        return int(args.func(args) or 0)
    except KVPolicyError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
