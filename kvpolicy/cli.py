"""The ``kvpolicy`` console script.

Exit codes: 0 success; 1 ``kvpolicy validate`` found an invalid config; 2 bad input (argparse's usage
errors, and ``kvpolicy: error: ...``, one line on stderr, for the errors kvpolicy raises on purpose:
:class:`~kvpolicy.errors.KVPolicyError`, unreadable files, invalid values); 141 (128 + SIGPIPE, as a
shell tool killed by SIGPIPE) when the reader of stdout goes away (``kvpolicy plugins | head -1``), with
no traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from kvpolicy.errors import KVPolicyError

DEMO_QUESTION = "What is the name of the young man who has taken Netherfield Park?"
BUDGET_ALLOWED = "a ratio in (0, 1] (0.2), a percentage in (0, 100] (20%) or a token count >= 1 (512)"
EXIT_BROKEN_PIPE = 128 + 13  # 128 + SIGPIPE, what a shell reports for a tool killed by SIGPIPE


class CLIError(Exception):
    """Bad command-line input found after parsing: printed as ``kvpolicy: error: ...``, exit code 2."""


def _budget(value: str) -> float | int:
    """``--budget``: ``"0.2"`` -> 0.2 (ratio), ``"20%"`` -> 0.2, ``"512"`` -> 512 (tokens).

    Only the flag's syntax and range are checked here; the policy's whole budget (sinks, recent window)
    is validated by :func:`kvpolicy.load_policy`.
    """
    text = value.strip()
    try:
        if text.endswith("%"):
            budget: float | int = float(text[:-1]) / 100
        else:
            budget = int(text) if text.lstrip("+-").isdigit() else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number; allowed: {BUDGET_ALLOWED}") from None
    if isinstance(budget, int) and budget < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: a token count must be >= 1; allowed: {BUDGET_ALLOWED}")
    if isinstance(budget, float) and not (math.isfinite(budget) and 0 < budget <= 1):
        raise argparse.ArgumentTypeError(f"{value!r} is out of range; allowed: {BUDGET_ALLOWED}")
    return budget


def _escape(help_text: str) -> str:
    return help_text.replace("%", "%%")  # argparse %-formats help strings


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer; allowed: an integer >= 1") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: allowed: an integer >= 1")
    return n


def _read_text(path: str, option: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CLIError(f"{option} {path!r}: no such file") from None
    except IsADirectoryError:
        raise CLIError(f"{option} {path!r}: is a directory; give a text file") from None
    except UnicodeDecodeError as err:
        raise CLIError(f"{option} {path!r}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise CLIError(f"{option} {path!r}: cannot read it ({err.strerror or err})") from None


_MODELS: dict[str | None, tuple[Any, Any]] = {}  # loaded once per process (in-process callers, tests)


def _load_model(path: str | None) -> tuple[Any, Any]:
    from kvpolicy import models

    if path not in _MODELS:
        try:
            _MODELS[path] = models.load_any(path)
        except (OSError, ValueError) as err:  # not a model directory, files missing, embedded model not installed
            where = f"--model {path!r}" if path else "the embedded model"
            raise CLIError(f"cannot load {where}: {err}") from None
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

    overrides = {"budget": args.budget} if args.budget is not None else {}
    policy = load_policy(args.policy, **overrides)
    context = _read_text(args.prompt_file, "--prompt-file")  # bad input fails before the model loads
    if args.questions_file is not None:
        if args.question is not None:
            raise SystemExit("kvpolicy run: give --question or --questions-file, not both")
        questions = [q.strip() for q in _read_text(args.questions_file, "--questions-file").splitlines() if q.strip()]
        if not questions:
            raise SystemExit(f"kvpolicy run: --questions-file {args.questions_file} holds no question (one per line)")
        return _run_questions(args, policy, context, questions)
    model, tok = _load_model(args.model)
    answer, report, dt = generate_answer(model, tok, context, args.question or "", policy, args.max_new_tokens)
    print(f"policy: {policy.name} ({policy.budget.describe()})")
    print(f"answer: {answer}")
    print(report)
    print(f"generation took {dt:.1f} s")
    return 0


def _run_questions(args: argparse.Namespace, policy: Any, context: str, questions: list[str]) -> int:
    """The context compressed once, then every question answered from it (kvpolicy.CompressedContext)."""
    from kvpolicy.context import CompressedContext

    model, tok = _load_model(args.model)
    with CompressedContext(model, tok, context, policy) as ctx:
        print(f"policy: {policy.name} ({policy.budget.describe()})")
        print(f"context: {len(ctx.context_ids)} tokens, prefilled and compressed once in {ctx.prefill_seconds:.1f} s")
        for i, q in enumerate(questions, 1):
            a = ctx.ask(q, max_new_tokens=args.max_new_tokens)
            print(f"[{i}] question: {q}\n[{i}] answer: {a.text}  ({a.seconds:.1f} s)")
        print(ctx.report)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from kvpolicy import data
    from kvpolicy.config import load_policy

    policies = [(name, load_policy(name, budget=args.budget) if name != "full" else load_policy("full"))
                for name in args.policies]  # bad names fail before the model loads
    model, tok = _load_model(args.model)
    text = data.austen_text("Pride & Prejudice")
    start = text.index("Chapter 1") if "Chapter 1" in text else 0
    ids = tok(text[start:], add_special_tokens=False)["input_ids"][: args.tokens]
    context = tok.decode(ids)
    print(f"context: the first {len(ids)} tokens of Pride & Prejudice (Jane Austen, public domain)")
    print(f"question: {args.question}\n")
    for name, policy in policies:
        answer, report, dt = generate_answer(model, tok, context, args.question, policy, args.max_new_tokens)
        print(f"=== {name} ({policy.budget.describe()}): {answer!r}  [{dt:.1f} s]")
        if name != "full" or args.verbose:
            print(report)
        print()
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from kvpolicy.registry import get_registry

    reg = get_registry()
    header = ("kind", "name", "plugin", "distribution", "paper", "description")
    rows = [(r.kind, r.name, r.plugin, f"{r.distribution} {r.version}".strip(), reg.paper_of(r), r.description)
            for r in reg.rows()]
    notes = [f"FAILED {name}: {msg}" for name, msg in reg.failed.items()]
    notes += [f"DISABLED {name} (distribution {off.distribution})" for name, off in reg.disabled.items()]
    if args.json:  # stdout stays one JSON document; what did not load goes to stderr
        print(json.dumps([dict(zip(header, r)) for r in rows], indent=2))
        for note in notes:
            print(note, file=sys.stderr)
        return 0
    rows = [(*r[:4], r[4] or "-", r[5]) for r in rows]  # the table marks a step that follows no paper
    w = [max(len(r[i]) for r in [*rows, header]) for i in range(len(header) - 1)]
    for r in [header, *rows]:
        print("  ".join(f"{c:<{w[i]}}" for i, c in enumerate(r[:-1])) + f"  {r[-1]}")
    if notes:
        print()
        for note in notes:
            print(note)
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
    ap = argparse.ArgumentParser(prog="kvpolicy", description="KV-cache compression policies for transformers",
                                 epilog="exit codes: 0 ok, 1 invalid config (validate), 2 bad input, 141 stdout "
                                        "closed early (e.g. piped into head)")
    sub = ap.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="generate with a compressed cache and print the answer and the cache report")
    run.add_argument("--policy", required=True, help="preset name or YAML/JSON/TOML file")
    run.add_argument("--prompt-file", required=True, help="text file with the context")
    run.add_argument("--question", default=None, help="question appended after the context")
    run.add_argument("--questions-file", default=None,
                     help="text file with one question per line: the context is compressed once, each question "
                          "answered from that state")
    run.add_argument("--budget", type=_budget, default=None,
                     help=f"overrides the policy's budget: {_escape(BUDGET_ALLOWED)}")
    run.add_argument("--model", default=None, help="an embedded model (smollm2-135m-instruct, gemma3-270m) or a local transformers model directory "
                     "(default: embedded SmolLM2)")
    run.add_argument("--max-new-tokens", type=_positive_int, default=64)
    _add_trace(run)
    run.set_defaults(func=cmd_run)

    demo = sub.add_parser("demo", help="answer a question about a real Austen chapter with compressed caches")
    demo.add_argument("--policies", nargs="+", default=["full", "snapkv", "h2o", "streaming"])
    demo.add_argument("--budget", type=_budget, default=0.35,
                      help=f"{_escape(BUDGET_ALLOWED)} (default 0.35: the smallest of 0.2/0.3/0.35 at which "
                           f"SnapKV still answers the default question correctly)")
    demo.add_argument("--tokens", type=_positive_int, default=2500, help="context length in tokens")
    demo.add_argument("--question", default=DEMO_QUESTION)
    demo.add_argument("--model", default=None)
    demo.add_argument("--max-new-tokens", type=_positive_int, default=24)
    demo.add_argument("--verbose", action="store_true")
    _add_trace(demo)
    demo.set_defaults(func=cmd_demo)

    plugins = sub.add_parser("plugins", help="list registered components and presets, and the plugins that did "
                                              "not load")
    plugins.add_argument("--json", action="store_true",
                         help="the table as JSON on stdout; plugins that failed or are disabled go to stderr")
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


def _one_line(message: str) -> str:
    return "; ".join(line.strip() for line in message.splitlines() if line.strip())


def _dispatch(args: argparse.Namespace) -> int:
    if getattr(args, "trace", None):
        from kvpolicy import telemetry_setup

        with telemetry_setup.setup(args.trace):
            return int(args.func(args) or 0)
    return int(args.func(args) or 0)


def main(argv: list[str] | None = None) -> int:
    from pydantic import ValidationError

    args = build_parser().parse_args(argv)
    try:
        rc = _dispatch(args)
        sys.stdout.flush()  # a closed pipe shows up here, not in the interpreter's exit
        return rc
    except (KVPolicyError, CLIError) as err:
        print(f"kvpolicy: error: {_one_line(str(err))}", file=sys.stderr)
        return 2
    except ValidationError as err:
        from kvpolicy.config import format_validation

        problems = format_validation(err, prefix=err.title, allowed=())  # e.g. "Budget.ratio: ..."
        print(f"kvpolicy: error: {_one_line(problems)}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # the reader went away (`kvpolicy plugins | head -1`): point stdout at devnull so that the flush at
        # exit does not fail again (https://docs.python.org/3/library/signal.html#note-on-sigpipe)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
