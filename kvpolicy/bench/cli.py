"""Arguments and entry of ``kvpolicy bench`` (wired into :mod:`kvpolicy.cli`)."""

from __future__ import annotations

import argparse
import sys
import time

from kvpolicy.bench.runner import ALL_METRICS, DEFAULT_POLICIES, BenchConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="an embedded model (smollm2-135m-instruct, gemma3-270m) or a local transformers model directory "
                     "(default: embedded SmolLM2)")
    p.add_argument("--policies", nargs="+", default=list(DEFAULT_POLICIES),
                   help="preset names or config files, or 'all' (every registered preset); 'full' always runs "
                        "as the reference")
    p.add_argument("--budgets", nargs="+", type=float, default=[0.1, 0.2, 0.5], help="budget ratios in (0, 1]")
    p.add_argument("--contexts", nargs="+", type=int, default=[2000], help="context lengths in tokens")
    p.add_argument("--samples", type=int, default=1, help="samples (seeds) per context length")
    p.add_argument("--metrics", nargs="+", default=[m for m in ALL_METRICS if m != "rss"], choices=ALL_METRICS,
                   help="quality: continuation copy fidelity passkey mass; speed: timings of the quality runs; "
                        "rss: prefill/decode time and peak memory in a fresh subprocess per configuration")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--continuation", type=int, default=48, help="continuation tokens scored")
    p.add_argument("--span", type=int, default=48, help="long-range copy span (tokens)")
    p.add_argument("--cue", type=int, default=8, help="copy tokens given as the cue (not scored)")
    p.add_argument("--gen-tokens", type=int, default=24, help="greedy tokens compared with the full cache")
    p.add_argument("--depths", nargs="+", type=float, default=[0.25, 0.75], help="passkey needle depths")
    p.add_argument("--decode-tokens", type=int, default=32, help="decode steps timed by the rss runs")
    p.add_argument("--out", default=None, help="directory for CSV / JSON / PNG results (default: bench-results/DATE)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 is fastest on a machine shared by other jobs)")
    p.add_argument("--no-plots", action="store_true")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    cfg = BenchConfig(policies=list(args.policies), budgets=list(args.budgets), contexts=list(args.contexts),
                      samples=args.samples, metrics=list(args.metrics), seed=args.seed,
                      continuation=args.continuation, span=args.span, cue=args.cue, gen_tokens=args.gen_tokens,
                      depths=tuple(args.depths), decode_tokens=args.decode_tokens, threads=args.threads)
    cfg.check()
    return cfg


def run_from_args(args: argparse.Namespace) -> int:
    import torch

    from kvpolicy import models
    from kvpolicy.bench import run_bench

    try:
        cfg = config_from_args(args)
    except ValueError as err:
        print(f"kvpolicy: error: {err}", file=sys.stderr)
        return 2
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = args.out or f"bench-results/{time.strftime('%Y%m%d-%H%M%S')}"
    model, tok = models.load_any(args.model)
    run_bench(model, tok, cfg, out, model_path=args.model, plots=not args.no_plots)
    return 0
