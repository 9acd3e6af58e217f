"""Results of ``kvpolicy bench``: aggregation over samples, a rich table, CSV / JSON files, PNG plots."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

KEYS = ("policy", "budget", "context")
# columns of the terminal table: (key, header, format)
COLUMNS = (
    ("continuation_ppl", "cont. ppl", "{:.2f}"),
    ("copy_nll", "copy NLL", "{:.3f}"),
    ("greedy_agreement", "agree", "{:.2f}"),
    ("greedy_rouge_l", "ROUGE-L", "{:.2f}"),
    ("passkey_acc", "passkey", "{:.2f}"),
    ("attention_mass", "attn mass", "{:.3f}"),
    ("prefill_s", "prefill s", "{:.2f}"),
    ("compress_s", "compress s", "{:.3f}"),
    ("decode_ms_per_token", "decode ms/tok", "{:.1f}"),
    ("kv_ratio", "KV kept", "{:.2f}"),
    ("peak_rss_mb", "peak RSS MiB", "{:.0f}"),
    ("prefill_peak_delta_mb", "prefill +MiB", "{:.0f}"),
)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def aggregate(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean of every numeric field over samples, per (policy, budget, context); ``n`` = samples."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        if "error" in r:
            continue
        groups.setdefault(tuple(r.get(k) for k in KEYS), []).append(r)
    out = []
    for key, rs in groups.items():
        agg: dict[str, Any] = dict(zip(KEYS, key))
        agg["n"] = len(rs)
        fields = [k for r in rs for k in r if k not in KEYS and k != "seed" and _is_num(r[k])]
        for f in dict.fromkeys(fields):
            vals = [float(r[f]) for r in rs if _is_num(r.get(f)) and not math.isnan(float(r[f]))]
            agg[f] = sum(vals) / len(vals) if vals else float("nan")
        out.append(agg)
    return sorted(out, key=lambda a: (a["context"], a["policy"] != "full", a["policy"], a["budget"]))


def write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    return path


def write_json(payload: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, default=str))
    return path


def rich_table(summary: list[dict[str, Any]], title: str = "kvpolicy bench") -> Any:
    """A :class:`rich.table.Table` of the aggregated rows (only columns that hold data)."""
    from rich.table import Table

    cols = [c for c in COLUMNS if any(_is_num(r.get(c[0])) for r in summary)]
    t = Table(title=title)
    for h in ("context", "policy", "budget"):
        t.add_column(h, justify="right" if h != "policy" else "left")
    for _, h, _ in cols:
        t.add_column(h, justify="right")
    for r in summary:
        cells = [str(r["context"]), str(r["policy"]), f"{r['budget']:g}"]
        for k, _, fmt in cols:
            v = r.get(k)
            cells.append(fmt.format(v) if _is_num(v) and not math.isnan(float(v)) else "-")
        t.add_row(*cells)
    return t


def markdown_table(summary: list[dict[str, Any]], columns: Iterable[tuple[str, str, str]] = COLUMNS) -> str:
    """The aggregated rows as a Markdown table (for docs/results)."""
    cols = [c for c in columns if any(_is_num(r.get(c[0])) for r in summary)]
    head = "| context | policy | budget | " + " | ".join(h for _, h, _ in cols) + " |"
    sep = "|---:|:---|---:|" + "---:|" * len(cols)
    lines = [head, sep]
    for r in summary:
        cells = [str(r["context"]), str(r["policy"]), f"{r['budget']:g}"]
        for k, _, fmt in cols:
            v = r.get(k)
            cells.append(fmt.format(v) if _is_num(v) and not math.isnan(float(v)) else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


QUALITY_PLOTS = (("copy_nll", "long-range copy NLL (lower is better)"),
                 ("continuation_nll", "continuation NLL (lower is better)"),
                 ("greedy_agreement", "greedy token agreement with the full cache"),
                 ("passkey_acc", "passkey exact match"),
                 ("attention_mass", "attention mass retained"))


def plot_quality(summary: list[dict[str, Any]], out_dir: Path, x: str = "budget") -> list[Path]:
    """One PNG per context length: each quality metric vs ``x`` (``"budget"``, or ``"kv_ratio"``: the KV
    bytes held over the full cache's), a line per policy (full = dashed)."""
    xlabel = ("budget (share of the context kept)" if x == "budget"
              else "KV bytes held (share of the full cache)")
    name = "quality" if x == "budget" else "quality_bytes"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for n in sorted({r["context"] for r in summary}):
        rs = [r for r in summary if r["context"] == n]
        metrics = [(k, t) for k, t in QUALITY_PLOTS if any(_is_num(r.get(k)) for r in rs)]
        if not metrics:
            continue
        ncol = min(3, len(metrics))
        nrow = (len(metrics) + ncol - 1) // ncol
        fig, axes = plt.subplots(nrow, ncol, figsize=(5.0 * ncol, 3.8 * nrow), squeeze=False)
        flat = [ax for row in axes for ax in row]
        policies = sorted({r["policy"] for r in rs})
        colors = plt.get_cmap("tab20")
        for ax, (k, title) in zip(flat, metrics):
            for i, pol in enumerate(policies):
                pts = sorted((r[x], r[k]) for r in rs if r["policy"] == pol and _is_num(r.get(k)) and _is_num(r.get(x)))
                if not pts:
                    continue
                if pol == "full":
                    ax.axhline(pts[0][1], color="black", linestyle="--", linewidth=1, label="full")
                else:
                    peer = ":" in pol  # e.g. kvpress:snapkv
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="s" if peer else "o",
                            linestyle=":" if peer else "-", color=colors(i % 20), label=pol)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel(xlabel)
            ax.grid(alpha=0.3)
        for ax in flat[len(metrics):]:
            ax.axis("off")
        handles, labels = flat[0].get_legend_handles_labels()
        (flat[-1] if len(flat) > len(metrics) else flat[0]).legend(handles, labels, fontsize=7, loc="center")
        fig.suptitle(f"quality vs {'budget' if x == 'budget' else 'bytes held'}, {n}-token contexts")
        fig.tight_layout()
        p = out_dir / f"{name}_{n}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths


def plot_speed(summary: list[dict[str, Any]], out_dir: Path, budget: float | None = None) -> Path | None:
    """Prefill time, decode ms/token and KV bytes vs context length, a line per policy (at ``budget``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(k, t) for k, t in (("prefill_s", "prefill time (s)"), ("decode_ms_per_token", "decode ms/token"),
                                  ("compress_s", "compression time (s)"), ("kv_bytes", "KV bytes after prefill"))
              if any(_is_num(r.get(k)) for r in summary)]
    if not panels:
        return None
    budgets = sorted({r["budget"] for r in summary if r["policy"] != "full"})
    b = budget if budget is not None else (0.2 if 0.2 in budgets else (budgets[0] if budgets else 1.0))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (k, title) in zip(axes[0], panels):
        for pol in sorted({r["policy"] for r in summary}):
            pts = sorted((r["context"], r[k]) for r in summary if r["policy"] == pol and _is_num(r.get(k))
                         and (pol in ("full", "plain") or r["budget"] == b))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=pol,
                        linestyle="--" if pol in ("full", "plain") else "-")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("context length (tokens)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"time and memory vs context length (budget {b:g})")
    fig.tight_layout()
    p = out_dir / "speed.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p


def write_all(rows: list[dict[str, Any]], meta: dict[str, Any], out_dir: str | Path, *, plots: bool = True
              ) -> dict[str, Path]:
    """``samples.csv`` (one row per run), ``summary.csv``, ``results.json`` (meta + both), PNG plots."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = aggregate(rows)
    files = {"samples_csv": write_csv(rows, out / "samples.csv"),
             "summary_csv": write_csv(summary, out / "summary.csv"),
             "json": write_json({"meta": meta, "summary": summary, "rows": rows}, out / "results.json")}
    if plots:
        for i, p in enumerate(plot_quality(summary, out)):
            files[f"plot_quality_{i}"] = p
        sp = plot_speed(summary, out)
        if sp is not None:
            files["plot_speed"] = sp
    return files
