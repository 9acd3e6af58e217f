"""Quality and speed harness behind ``kvpolicy bench`` (see docs/benchmarks.md).

- :mod:`~kvpolicy.bench.tasks`: samples from real Austen text (continuation, long-range copy, passkeys);
- :mod:`~kvpolicy.bench.metrics`: metrics and the branch protocol (torch only; shared with the kvpress peer);
- :mod:`~kvpolicy.bench.runner`: one compressed prefill per (policy, budget, sample), branches from it;
- :mod:`~kvpolicy.bench.speed`: prefill / decode time and peak memory in a fresh subprocess;
- :mod:`~kvpolicy.bench.report`: aggregation, rich table, CSV / JSON, PNG plots.
"""

from __future__ import annotations

from kvpolicy.bench.runner import ALL_METRICS, DEFAULT_POLICIES, BenchConfig, run_quality

__all__ = ["ALL_METRICS", "DEFAULT_POLICIES", "BenchConfig", "run_quality", "run_bench"]


def run_bench(model: object, tok: object, cfg: BenchConfig, out_dir: str | None = None, *, model_path: str | None = None,
              books: dict[str, str] | None = None, plots: bool = True, console: object | None = None) -> list[dict]:
    """Run the quality sweep (and isolated speed runs when ``speed``/``rss`` is asked for) with progress bars.

    Writes CSV / JSON / PNG files under ``out_dir`` (after every run, so partial results survive) and
    prints the aggregated table. Returns the per-run rows.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from kvpolicy.bench import report, speed

    import sys

    # piped output (logs, CI) gets a wide table rather than wrapped headers
    con = console if console is not None else (Console() if sys.stdout.isatty() else Console(width=220))
    meta = {"config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(cfg).items()},
            "model": model_path or "embedded SmolLM2-135M-Instruct", "machine": speed.machine_info()}
    rows: list[dict] = []

    def save() -> None:
        if out_dir is not None:
            report.write_all(rows, meta, out_dir, plots=False)

    quality = [m for m in cfg.metrics if m not in ("rss",)]
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=con, transient=False) as prog:
        task = prog.add_task("quality", total=None)
        if any(m in quality for m in ("continuation", "copy", "fidelity", "passkey", "mass", "speed")):
            started = [False]

            def progress(desc: str, total: int) -> None:
                if started[0]:
                    prog.advance(task)
                started[0] = True
                prog.update(task, description=f"quality: {desc}", total=total)

            def on_row(row: dict) -> None:
                rows.append(row)
                save()

            run_quality(model, tok, cfg, books=books, progress=progress, on_row=on_row)
            prog.advance(task)
        if "rss" in cfg.metrics:
            from kvpolicy.bench.runner import expand_policies

            specs = [{"policy": speed.PLAIN, "n_ctx": n} for n in cfg.contexts]
            specs += [{"policy": "full", "n_ctx": n} for n in cfg.contexts]
            specs += [{"policy": p, "budget": b, "n_ctx": n} for n in cfg.contexts for p in expand_policies(cfg.policies)
                      for b in cfg.budgets]
            stask = prog.add_task("speed/RSS (subprocess per configuration)", total=len(specs))
            for spec in specs:
                spec.update(decode=cfg.decode_tokens, seed=cfg.seed, model=model_path, threads=cfg.threads)
                prog.update(stask, description=f"speed/RSS: {spec['policy']} @ {spec.get('budget', 1.0)} "
                                               f"({spec['n_ctx']} tok)")
                res = speed.measure_isolated(spec)
                res["seed"] = cfg.seed
                res["isolated"] = True
                rows.append(res)
                save()
                prog.advance(stask)
    summary = report.aggregate(_merge_isolated(rows))
    con.print(report.rich_table(summary, title=f"kvpolicy bench - {meta['model']}"))
    if out_dir is not None:
        files = report.write_all(rows, meta, out_dir, plots=plots)
        report.write_csv(summary, __import__("pathlib").Path(out_dir) / "summary.csv")
        con.print("wrote " + ", ".join(str(p) for p in files.values()))
    return rows


def _merge_isolated(rows: list[dict]) -> list[dict]:
    """For the table: the isolated speed runs' memory figures joined onto the quality rows of the same config."""
    iso = {(r["policy"], r.get("budget"), r["context"]): r for r in rows if r.get("isolated") and "error" not in r}
    out = []
    for r in rows:
        if r.get("isolated"):
            if not any(q.get("policy") == r["policy"] and q.get("context") == r["context"] and not q.get("isolated")
                       for q in rows):
                out.append(r)  # e.g. plain transformers: speed only
            continue
        m = dict(r)
        hit = iso.get((r["policy"], r["budget"], r["context"]))
        if hit is not None:
            m.update({k: hit[k] for k in ("peak_rss_mb", "prefill_peak_delta_mb") if k in hit})
        out.append(m)
    return out
