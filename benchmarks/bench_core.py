"""Core performance table (issue 2): SmolLM2 prefill / decode time and peak memory per policy.

Every configuration runs in a fresh subprocess (:func:`kvpolicy.bench.speed.measure_isolated`): the model
is loaded, warmed up, then an ``n``-token Austen context is prefilled and ``--decode`` tokens decoded one
at a time. Rows: plain transformers (``DynamicCache``, no kvpolicy), kvpolicy's uncompressed path
(``full``), and each policy at ``--budget``. Derived columns:

- ``prefill CPU / plain``: prefill CPU time (``time.process_time``, steadier than wall time on a shared
  machine) relative to plain transformers;
- ``prefill CPU overhead``: the same as a signed share: everything kvpolicy adds to a prefill, including
  exact accumulated attention computed inside the attention (which ``score+select`` does not see);
- ``score+select % of plain prefill``: kvpolicy's compression time (``cache.report().seconds``: scoring,
  selection, gather/merge of every layer) as a share of plain transformers' prefill time (target <= 5 %);
- ``extra peak % of full KV``: the prefill's peak RSS growth minus plain transformers', as a share of the
  full KV size (target <= 10 %; negative = less memory than plain, the compressed cache being smaller).

    python benchmarks/bench_core.py --contexts 2000 8000 --threads 1 --out docs/results/core.md
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from kvpolicy.bench import speed

POLICIES = ("streaming", "h2o", "snapkv", "tova", "knorm", "pyramidkv")


def derive(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    plain = {r["context"]: r for r in rows if r["policy"] == speed.PLAIN and "error" not in r}
    out = []
    for r in rows:
        d = dict(r)
        p = plain.get(r["context"])
        if p is not None and "error" not in r:
            d["prefill_vs_plain"] = r["prefill_s"] / p["prefill_s"]
            if "prefill_cpu_s" in r and "prefill_cpu_s" in p:
                d["prefill_cpu_vs_plain"] = r["prefill_cpu_s"] / p["prefill_cpu_s"]
                d["cpu_overhead_share"] = (r["prefill_cpu_s"] - p["prefill_cpu_s"]) / p["prefill_cpu_s"]
            d["compress_share"] = r["compress_s"] / p["prefill_s"]
            d["extra_peak_share"] = (r["prefill_peak_delta_mb"] - p["prefill_peak_delta_mb"]) * 2**20 / r["kv_bytes_full"]
        out.append(d)
    return out


def markdown(rows: list[dict[str, Any]], machine: dict[str, Any], args: argparse.Namespace) -> str:
    head = ("| context | policy | budget | prefill s | prefill CPU s | prefill CPU / plain | prefill CPU overhead | "
            "score+select s | score+select % of plain prefill | decode ms/tok | decode CPU ms/tok | KV MiB | "
            "full KV MiB | prefill peak +MiB | extra peak % of full KV | peak RSS MiB |")
    lines = [head, "|---:|:---|---:|" + "---:|" * 13]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['context']} | {r['policy']} | {r.get('budget')} | error: {r['error'][:80]} |")
            continue

        def f(key: str, fmt: str, scale: float = 1.0) -> str:
            v = r.get(key)
            return fmt.format(v * scale) if isinstance(v, (int, float)) else "-"

        lines.append(" | ".join([
            f"| {r['context']}", r["policy"], f"{r['budget']:g}", f("prefill_s", "{:.2f}"), f("prefill_cpu_s", "{:.2f}"),
            f("prefill_cpu_vs_plain", "{:.2f}"), f("cpu_overhead_share", "{:+.1f} %", 100), f("compress_s", "{:.3f}"), f("compress_share", "{:.1f} %", 100),
            f("decode_ms_per_token", "{:.1f}"), f("decode_cpu_ms_per_token", "{:.1f}"),
            f("kv_bytes", "{:.1f}", 2**-20), f("kv_bytes_full", "{:.1f}", 2**-20), f("prefill_peak_delta_mb", "{:.0f}"),
            f("extra_peak_share", "{:+.1f} %", 100), f("peak_rss_mb", "{:.0f}")]) + " |")
    m = machine
    return (f"# Core performance (issue 2)\n\nMeasured {m['date_utc']} on {m['cpu']} ({m['cores']} cores, "
            f"{m['memory_gib']} GiB), torch {m['torch']} with {args.threads or 'default'} thread(s), transformers "
            f"{m['transformers']}, kvpolicy {m['kvpolicy']}; model: embedded SmolLM2-135M-Instruct (fp32); "
            f"{args.decode} decode steps; one fresh process per row.\n\n"
            "Command: `python benchmarks/bench_core.py " + " ".join(sys.argv[1:]) + "`\n\n" + "\n".join(lines) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", nargs="+", type=int, default=[2000, 8000])
    ap.add_argument("--policies", nargs="+", default=list(POLICIES))
    ap.add_argument("--budget", type=float, default=0.2)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--model", default=None)
    ap.add_argument("--repeats", type=int, default=1,
                    help="fresh processes per row; the row kept is the one with the least prefill CPU time")
    ap.add_argument("--out", default="bench-results/core.md")
    ap.add_argument("--json", default=None, help="also write the raw rows here (default: next to --out)")
    ap.add_argument("--render", nargs="+", default=None, metavar="JSON",
                    help="measure nothing: merge the rows of these saved runs into one table at --out")
    args = ap.parse_args()
    if args.render:
        runs = [json.loads(Path(p).read_text()) for p in args.render]
        rows = [r for run in runs for r in run["rows"]]
        Path(args.out).write_text(markdown(rows, runs[-1]["machine"], args))  # rows derived per run
        print(Path(args.out).read_text())
        return 0
    machine = speed.machine_info()
    if args.threads:
        machine["torch_threads"] = args.threads
    rows: list[dict[str, Any]] = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    raw = Path(args.json) if args.json else out.with_suffix(".json")
    for n in args.contexts:
        specs = [{"policy": speed.PLAIN}, {"policy": "full"}] + [{"policy": p, "budget": args.budget}
                                                                for p in args.policies]
        for spec in specs:
            spec.update(n_ctx=n, decode=args.decode, threads=args.threads, model=args.model)
            t0 = time.time()
            tries = [speed.measure_isolated(spec) for _ in range(max(1, args.repeats))]
            ok = [t for t in tries if "error" not in t]
            res = min(ok, key=lambda t: t["prefill_cpu_s"]) if ok else tries[0]
            if len(ok) > 1:
                res["prefill_cpu_s_tries"] = [t["prefill_cpu_s"] for t in ok]
            rows.append(res)
            print(f"[{time.time() - t0:5.0f}s] {n} {spec['policy']}: " + json.dumps(
                {k: round(v, 3) if isinstance(v, float) else v for k, v in res.items()}), flush=True)
            table = derive(rows)
            out.write_text(markdown(table, machine, args))
            raw.write_text(json.dumps({"machine": machine, "rows": table}, indent=1))
    print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
