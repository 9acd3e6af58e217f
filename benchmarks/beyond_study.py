"""Issue 9 study: mass-preserving merges and context-reconstruction scores vs H2O eviction.

Uses the benchmark harness (:mod:`kvpolicy.bench`): the same Austen samples, the same branches
(long-range copy NLL, continuation NLL, greedy agreement with the full cache) and the same cost figures
(``prefill_s`` includes the reconstruction pass of deferred policies; ``compress_s`` the policy time).

    python benchmarks/beyond_study.py --budgets 0.2 --contexts 2000 --out /tmp/beyond.jsonl [--only h2o,...]

Rows are appended to ``--out`` (JSON lines) as they finish; ``--table`` prints a markdown table of a file.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

H2O = {"ratio": 0.2, "sink": 4, "recent": 0.5}
KVZIP = {"ratio": 0.2, "sink": 4, "recent": 0.1}
ACC = {"name": "accumulated-attention"}
MASS = {"name": "mass", "keys": "keep", "weights": "attention", "mass": "count"}


def _cfg(name: str, scorer: dict, merger: dict, budget: dict) -> dict[str, Any]:
    return {"name": name, "budget": budget, "scorer": scorer, "selector": {"name": "topk"}, "merger": merger,
            "decode": {"name": "none"}, "layers": {"name": "uniform"}}


#: name -> config (or a preset name); the order is the run order (most important first)
VARIANTS: dict[str, Any] = {
    "h2o": "h2o",
    "h2o-mass": "h2o-mass",  # value-only, attention weights, +log n
    "h2o-mass-wbias": _cfg("h2o-mass-wbias", ACC, {**MASS, "mass": "weight"}, H2O),
    "h2o-mass-keys": "h2o-mass-keys",
    "h2o-mass-count": _cfg("h2o-mass-count", ACC, {**MASS, "weights": "count"}, H2O),
    "h2o-mass-nobias": _cfg("h2o-mass-nobias", ACC, {**MASS, "mass": "none"}, H2O),
    "h2o-mass-q50": _cfg("h2o-mass-q50", ACC, {**MASS, "quantile": 0.5}, H2O),
    "h2o-mass-cos0.5": _cfg("h2o-mass-cos0.5", ACC, {**MASS, "threshold": 0.5}, H2O),
    "lookm-pivot-notp": "lookm-pivot-notp",
    "lookm-pivot-mass": "lookm-pivot-mass",
    "lookm-pivot-mass-vonly": _cfg("lookm-pivot-mass-vonly", ACC, {"name": "mass-pivotal", "keys": "keep"}, H2O),
    "max-attention": _cfg("max-attention", {"name": "max-attention"}, {"name": "none"}, KVZIP),
    "kvzip-full": "kvzip-full",
    "kvzip-lite": "kvzip-lite",
    "kvzip-lite-mass": "kvzip-lite-mass",
    "kvzip-quarter": _cfg("kvzip-quarter", {"name": "reconstruction", "chunk": 512, "stride": 4}, {"name": "none"},
                          KVZIP),
    "kvzip-full-mass": _cfg("kvzip-full-mass", {"name": "reconstruction", "chunk": 512},
                            {**MASS, "weights": "score"}, KVZIP),
}

SHOW = ("copy_nll", "continuation_nll", "greedy_agreement", "prefill_s", "compress_s")


def run(args: argparse.Namespace) -> None:
    from kvpolicy import models
    from kvpolicy.bench import runner
    from kvpolicy.bench.tasks import make_samples
    from kvpolicy.config import load_policy

    torch.set_num_threads(args.threads)
    model, tok = models.load_default()
    names = args.only.split(",") if args.only else list(VARIANTS)
    metrics = {"continuation", "copy", "fidelity"}
    out = Path(args.out)
    samples = make_samples(tok, [int(c) for c in args.contexts.split(",")], args.samples, seed=args.seed)
    for sample in samples:
        ref = runner.run_one(model, tok, runner.REFERENCE, None, sample, metrics, record=True)
        reference = ref.pop("_reference")
        _emit(out, ref)
        for budget in [float(b) for b in args.budgets.split(",")]:
            for name in names:
                spec = VARIANTS[name]
                policy = load_policy(spec, budget=budget)
                t0 = time.perf_counter()
                row = runner.run_one(model, tok, policy, budget, sample, metrics, reference=reference)
                row["policy"] = name
                row["wall_s"] = time.perf_counter() - t0
                for key in ("continuation_nll", "copy_nll"):
                    row[f"{key}_vs_full"] = row[key] - ref[key]
                _emit(out, row)


def _emit(out: Path, row: dict[str, Any]) -> None:
    with out.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(" ".join(f"{k}={row[k]:.3f}" if isinstance(row.get(k), float) else f"{k}={row.get(k)}"
                   for k in ("policy", "budget", "context") + SHOW), flush=True)


def table(path: str) -> str:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    head = "| context | budget | policy | copy NLL | cont. NLL | greedy agr. | prefill s | compress s |"
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        lines.append(f"| {r['context']} | {r['budget']} | {r['policy']} | {r['copy_nll']:.3f} | "
                     f"{r['continuation_nll']:.3f} | {r.get('greedy_agreement', 1.0):.2f} | {r['prefill_s']:.1f} | "
                     f"{r['compress_s']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", default="0.2")
    ap.add_argument("--contexts", default="2000")
    ap.add_argument("--samples", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default="")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="beyond.jsonl")
    ap.add_argument("--table", default="", help="print the markdown table of a results file and exit")
    args = ap.parse_args()
    if args.table:
        print(table(args.table))
        return
    run(args)


if __name__ == "__main__":
    main()
