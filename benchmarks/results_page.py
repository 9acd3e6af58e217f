"""Build docs/results/index.md from ``kvpolicy bench`` runs and the kvpress peer's results.

    python benchmarks/results_page.py --ours bench-results/A-2k bench-results/B-2k \
        --kvpress bench-results/kvpress-2k --out docs/results

Reads each run's ``results.json`` (per-run rows), merges them (the reference ``full`` rows of several runs
are averaged), writes one table per (context, budget) with our policies and kvpress's side by side, a
combined quality plot per context, and the machine / versions / date of the runs.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

from kvpolicy.bench import report

TITLE = "Results: quality of every policy, ours and kvpress's"
COLS = (("n", "samples", "{:d}"), ("copy_nll", "copy NLL ↓", "{:.3f}"), ("continuation_nll", "cont. NLL ↓", "{:.3f}"),
        ("greedy_agreement", "greedy agree ↑", "{:.2f}"), ("greedy_rouge_l", "ROUGE-L ↑", "{:.2f}"),
        ("passkey_acc", "passkey ↑", "{:.2f}"), ("attention_mass", "attn mass ↑", "{:.3f}"),
        ("kv_ratio", "KV kept", "{:.3f}"))
#: how a run's ``model`` (``--model``) is named on the page
MODEL_NAMES = {None: "the embedded SmolLM2-135M-Instruct (fp32)",
               "embedded SmolLM2-135M-Instruct": "the embedded SmolLM2-135M-Instruct (fp32)",
               "gemma3-270m": "the packaged Gemma-3-270M base model (fp32; 15 of its 18 layers are sliding-window "
                              "layers, kept as 512-token windows: budgets apply to layers 5, 11 and 17)"}
#: speed is measured apart (docs/results/core.md): quality runs share the machine, so their times are not shown
SPEED_NOTE = ("Speed is not in these tables: the quality runs share the machine with other jobs, so their prefill, "
              "compression and decode times contradict isolated measurements; speed figures come from one "
              "isolated process each, on [core performance](core.md) (the raw times stay in each run's "
              "`results.json`).")

#: with ``--cost``: the one speed figure the tables carry, and where it comes from
COST_NOTE = ("`prefill CPU × plain` is the prefill's CPU time (compression included) over plain transformers' on "
             "the same context, measured apart: one fresh process per policy at budget 0.2, one thread, nothing "
             "else running (`benchmarks/bench_core.py`, its table on [core performance](core.md)); `-` where it "
             "was not measured (kvpress's rows: its prefill runs in another transformers). The quality runs' own "
             "times are not shown: they shared the machine with other jobs.")


def load_rows(dirs: list[str], source: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per-sample rows of every run; a (policy, budget, context, seed) measured by several runs (e.g. the
    ``full`` reference each run records) counts once, so means are not weighted towards repeated samples."""
    rows, metas = [], []
    seen: set[tuple[Any, ...]] = set()
    for d in dirs:
        p = Path(d) / "results.json"
        if not p.is_file():
            print(f"skipping {p}: not found")
            continue
        payload = json.loads(p.read_text())
        metas.append(payload.get("meta", {}))
        for r in payload["rows"]:
            if "error" in r or r.get("isolated"):
                continue
            r = dict(r, source=source)
            if str(r["policy"]).endswith((".yaml", ".yml", ".json", ".toml")):
                r["policy"] = Path(r["policy"]).stem  # a config file: its name, not its path
            if source == "kvpress" and r["policy"] == "kvpress:none":
                continue  # its reference duplicates ours (same model, same greedy path)
            key = (r["policy"], r.get("budget"), r.get("context"), r.get("seed"))
            if key in seen:
                continue
            seen.add(key)
            rows.append(r)
    return rows, metas


def _dates(metas: list[dict[str, Any]]) -> str:
    days = sorted({str(mm.get("machine", mm).get("date_utc", "?")) for mm in metas})
    return days[0] if len(days) == 1 else f"between {days[0]} and {days[-1]}"


def _seeds(rows: list[dict[str, Any]]) -> dict[int, set[int]]:
    out: dict[int, set[int]] = {}
    for r in rows:
        if r["policy"] == "full":
            out.setdefault(int(r["context"]), set()).add(int(r.get("seed", 0)))
    return out


def _num(r: dict[str, Any] | None, key: str) -> float | None:
    """``r[key]`` as a float, or None when absent, not a number or NaN."""
    v = (r or {}).get(key)
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(float(v))
    return float(v) if ok else None


def _look(policy: Any) -> tuple[str, str]:
    """(colour, marker) of a policy's points: ours blue circles, kvpress's red squares."""
    return ("tab:red", "s") if str(policy).startswith("kvpress:") else ("tab:blue", "o")


#: the isolated prefill cost column (``--cost``), shown only when such a measurement is given
COST_COL = ("prefill_cost", "prefill CPU × plain", "{:.2f}")


def load_cost(paths: list[str]) -> dict[tuple[str, int], float]:
    """``(policy, context) -> prefill CPU time over plain transformers'`` from ``benchmarks/bench_core.py`` JSON
    files (one fresh process per row, nothing else running); a config file's row is named by its stem."""
    cost: dict[tuple[str, int], float] = {}
    for path in paths:
        for r in json.loads(Path(path).read_text())["rows"]:
            if "error" in r or not isinstance(r.get("prefill_cpu_vs_plain"), (int, float)):
                continue
            name = str(r["policy"])
            if name.endswith((".yaml", ".yml", ".json", ".toml")):
                name = Path(name).stem
            cost[(name, int(r["context"]))] = float(r["prefill_cpu_vs_plain"])
    return cost


def table(rows: list[dict[str, Any]], cols: tuple[tuple[str, str, str], ...] = COLS) -> str:
    lines = ["| policy | " + " | ".join(h for _, h, _ in cols) + " |", "|:---|" + "---:|" * len(cols)]
    for r in rows:
        cells = []
        for k, _, fmt in cols:
            v = r.get(k)
            cells.append(fmt.format(v) if _num(r, k) is not None else "-")
        lines.append(f"| {r['policy']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_ranked(summary: list[dict[str, Any]], n: int, budget: float, out: Path) -> Path | None:
    """Every policy at ``budget`` on one chart: a row each, sorted by copy NLL, its copy and continuation NLL
    side by side and the KV bytes it holds in its label (ours blue circles, kvpress's red squares; dashed: the
    full cache). A policy far off the scale is drawn at the edge with its value written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in summary if r["context"] == n and r["budget"] == budget and r["policy"] != "full"
            and _num(r, "copy_nll") is not None]
    full = next((r for r in summary if r["context"] == n and r["policy"] == "full"), None)
    if len(rows) < 2:
        return None
    rows.sort(key=lambda r: -_num(r, "copy_nll"))  # best at the top
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.22 * len(rows) + 1.5), sharey=True)
    ys = list(range(len(rows)))
    for ax, (key, title) in zip(axes, (("copy_nll", "long-range copy NLL ↓"),
                                       ("continuation_nll", "continuation NLL ↓"))):
        vals = [_num(r, key) for r in rows]
        known = sorted(v for v in vals if v is not None)
        ref = _num(full, key)
        lo = min(known + ([ref] if ref is not None else []))
        q90 = known[int(0.9 * (len(known) - 1))]
        top = q90 + 0.35 * (q90 - lo) + 1e-6
        for y, r, v in zip(ys, rows, vals):
            if v is None:
                continue
            color, marker = _look(r["policy"])
            ax.plot([min(v, top)], [y], marker=marker, color=color, markersize=4.5)
            if v > top:
                ax.annotate(f"{v:.2f} →", (top, y), xytext=(-4, 0), textcoords="offset points", ha="right",
                            va="center", fontsize=6.5, color=color)
        if ref is not None:
            ax.axvline(ref, color="black", linestyle="--", linewidth=1)
        ax.set_xlim(lo - 0.03 * (top - lo), top + 0.02 * (top - lo))
        ax.set_title(f"{title}, budget {budget:g}, {n}-token contexts", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_yticks(ys)
    axes[0].set_yticklabels([f"{r['policy']}  ({_num(r, 'kv_ratio') or float('nan'):.2f} of the bytes)" for r in rows],
                            fontsize=7)
    for tick, r in zip(axes[0].get_yticklabels(), rows):
        tick.set_color(_look(r["policy"])[0])
    axes[0].set_ylim(-0.7, len(rows) - 0.3)
    fig.tight_layout()
    path = out / f"overview_ranked_{n}_{budget:g}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_frontier(summary: list[dict[str, Any]], n: int, out: Path) -> Path | None:
    """Copy and continuation NLL against the KV bytes held: every (policy, budget) a point (ours circles,
    kvpress's squares), the points no other beats on both (fewer or equal bytes and lower or equal NLL)
    joined as a frontier and named."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rs = [r for r in summary if r["context"] == n and r["policy"] != "full" and _num(r, "kv_ratio") is not None]
    full = next((r for r in summary if r["context"] == n and r["policy"] == "full"), None)
    if len(rs) < 2:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(14, 6.5))
    for ax, (key, title) in zip(axes, (("copy_nll", "long-range copy NLL ↓"),
                                       ("continuation_nll", "continuation NLL ↓"))):
        pts = [(_num(r, "kv_ratio"), _num(r, key), f"{r['policy']} @ {r['budget']:g}")
               for r in rs if _num(r, key) is not None]
        front, best = [], float("inf")
        for x, y, name in sorted(pts, key=lambda t: (t[0], t[1])):
            if y < best:
                front.append((x, y, name))
                best = y
        ref = _num(full, key)
        ys = sorted(y for _, y, _ in pts)
        top = ys[int(0.9 * (len(ys) - 1))] * 1.15
        for x, y, name in pts:
            color, marker = _look(name)
            ax.plot([x], [min(y, top)], marker=marker, color=color, markersize=4, alpha=0.45, linestyle="none")
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="0.3", linewidth=1)
        for x, y, name in front:
            ax.annotate(name, (x, y), xytext=(4, 3), textcoords="offset points", fontsize=7, color=_look(name)[0])
        if ref is not None:
            ax.axhline(ref, color="black", linestyle="--", linewidth=1, label="full cache")
        ax.set_ylim(min(ys + ([ref] if ref is not None else [])) - 0.1, top)
        ax.set_xlim(0, 1.08)
        ax.set_xlabel("KV bytes held (share of the full cache)")
        ax.set_title(f"{title}, {n}-token contexts: every policy and budget, the frontier named", fontsize=9)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / f"overview_frontier_{n}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ours", nargs="+", default=[])
    ap.add_argument("--kvpress", nargs="*", default=[])
    ap.add_argument("--out", default="docs/results")
    ap.add_argument("--notes", default=None, help="a Markdown file appended after the tables")
    ap.add_argument("--csv", default=None, help="also write the merged summary table as CSV here")
    ap.add_argument("--page", default="index.md", help="file name of the page written under --out")
    ap.add_argument("--title", default=TITLE, help="the page's title")
    ap.add_argument("--commands", default=None, help="a text file whose lines replace the default commands")
    ap.add_argument("--plot-prefix", default="", help="prefix of the PNG file names (quality_N.png)")
    ap.add_argument("--load-note", default="two benchmark processes ran side by side, one per core: timings are "
                    "indicative only", help="what else ran on the machine (in the page's first paragraph)")
    ap.add_argument("--cost", nargs="*", default=[], metavar="JSON",
                    help="benchmarks/bench_core.py JSON runs: adds an isolated 'prefill CPU × plain' column")
    ap.add_argument("--ranked", nargs="*", type=float, default=[], metavar="BUDGET",
                    help="also draw every policy's copy and continuation NLL at these budgets, ranked, bytes held "
                         "in the labels")
    ap.add_argument("--frontier", action="store_true",
                    help="draw NLL against bytes held as points with the frontier named, instead of a line per policy "
                         "(for pages with too many policies for a legend)")
    ap.add_argument("--exclude", nargs="*", default=[], metavar="POLICY",
                    help="rows of these policies are left off the page (e.g. a run's by-products)")
    a = ap.parse_args()
    ours, metas = load_rows(a.ours, "kvpolicy")
    peer, pmetas = load_rows(a.kvpress, "kvpress")
    ours = [r for r in ours if r["policy"] not in a.exclude]
    peer = [r for r in peer if r["policy"] not in a.exclude]
    summary = report.aggregate(ours + peer)
    cost = load_cost(a.cost)
    for r in summary:
        c = cost.get((str(r["policy"]), int(r["context"])))
        if c is not None:
            r["prefill_cost"] = c
    cols = COLS[:-1] + (COST_COL,) + COLS[-1:] if cost else COLS
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    m = metas[0].get("machine", {}) if metas else {}
    cfg = metas[0].get("config", {}) if metas else {}
    pm = pmetas[0] if pmetas else {}
    parts = [
        f"# {a.title}",
        "",
        f"Measured {_dates(metas + pmetas)} on {m.get('cpu', '?')} ({m.get('cores', '?')} cores, "
        f"{m.get('memory_gib', '?')} GiB; {a.load_note}), torch "
        f"{m.get('torch', '?')} with {cfg.get('threads') or m.get('torch_threads')} thread(s), transformers "
        f"{m.get('transformers', '?')}, kvpolicy {m.get('kvpolicy', '?')}"
        + (f"; kvpress {pm.get('kvpress')} with transformers {pm.get('transformers')} in its own virtualenv"
           if pm else "") + ".",
        "",
        f"Model: {MODEL_NAMES.get(metas[0].get('model') if metas else None, metas[0].get('model') if metas else '?')}. "
        "Text: Jane Austen's novels (`kvpolicy.data`). "
        "Samples per context: "
        + ", ".join(f"{n} tokens: {len(seeds)} (seeds {', '.join(str(x) for x in sorted(seeds))})"
                    for n, seeds in sorted(_seeds(ours).items()))
        + f"; figures are means over the samples. Continuation "
        f"{cfg.get('continuation')} tokens, copy span {cfg.get('span')} with a {cfg.get('cue')}-token cue, "
        f"{cfg.get('gen_tokens')} greedy tokens, passkey needles at depths {cfg.get('depths')}. "
        "How each figure is measured: [benchmarks](../benchmarks.md). `full` is the uncompressed cache; "
        "`kvpress:*` rows are kvpress's presses (budget b = `compression_ratio` 1 − b) on the same model, "
        "samples and metrics code. ↓ lower is better, ↑ higher is better. `KV kept` is the KV bytes held over "
        "the full cache's (kvpress's masking presses hold them all). "
        + (COST_NOTE if cost else SPEED_NOTE),
        "",
        "Commands:",
        "",
        "```bash",
        *([Path(a.commands).read_text().rstrip("\n")] if a.commands else []),
    ]
    default_commands = [
        "kvpolicy bench --policies POLICY... --budgets 0.1 0.2 0.5 --contexts 2000 --samples 1 --continuation 32 "
        "--span 48 --cue 8 --gen-tokens 16 --depths 0.5 --threads 1 --out bench-results/RUN",
        "# more samples: --seed 1 --samples 2; 6k contexts: --contexts 6000",
        "bash benchmarks/kvpress_env.sh --budgets 0.1 0.2 0.5 --threads 1 --out bench-results/kvpress-2k",
        "KVPRESS_SAMPLES=bench-results/samples-6k.json SAMPLE_ARGS='--contexts 6000 --samples 1 --continuation 32 "
        "--span 48 --cue 8 --gen-tokens 16 --depths 0.5' bash benchmarks/kvpress_env.sh --budgets 0.1 0.2 0.5 "
        "--threads 1 --out bench-results/kvpress-6k",
        "python benchmarks/results_page.py --ours bench-results/RUN... --kvpress bench-results/kvpress-... "
        "--out docs/results",
    ]
    parts += ([] if a.commands else default_commands) + ["```"]
    for n in sorted({r["context"] for r in summary}):
        full = [r for r in summary if r["context"] == n and r["policy"] == "full"]
        parts += ["", f"## {n}-token contexts", ""]
        budgets = sorted({r["budget"] for r in summary if r["context"] == n and r["policy"] != "full"})
        for b in budgets:
            rs = [r for r in summary if r["context"] == n and r["budget"] == b and r["policy"] != "full"]
            rs.sort(key=lambda r: (r.get("copy_nll", float("inf")) if not math.isnan(r.get("copy_nll", float("nan")))
                                   else float("inf")))
            parts += [f"### budget {b:g} (sorted by copy NLL)", "", table(full + rs, cols), ""]
        if a.frontier:
            png = plot_frontier(summary, n, out)
            if png is not None:
                parts += [f"![NLL vs bytes held, {n} tokens, every policy and budget]({png.name})", ""]
        for x, what in (() if a.frontier else (("budget", "budget"), ("kv_ratio", "bytes held"))):
            rows_n = [r for r in summary if r["context"] == n]
            if a.plot_prefix:  # drawn elsewhere, so that another page's quality_N.png is never overwritten
                with tempfile.TemporaryDirectory() as tmp:
                    pngs = [Path(shutil.move(p, out / (a.plot_prefix + p.name)))
                            for p in report.plot_quality(rows_n, Path(tmp), x=x)]
            else:
                pngs = report.plot_quality(rows_n, out, x=x)
            for p in pngs:
                parts += [f"![quality vs {what}, {n} tokens]({p.name})", ""]
        for b in a.ranked:
            png = plot_ranked(summary, n, b, out)
            if png is not None:
                parts += [f"![every policy at budget {b:g}, {n} tokens, ranked by copy NLL]({png.name})", ""]
    if a.notes and Path(a.notes).is_file():
        parts += ["", Path(a.notes).read_text()]
    (out / a.page).write_text("\n".join(parts) + "\n")
    if a.csv:
        report.write_csv(summary, Path(a.csv))
    print(out / a.page)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
