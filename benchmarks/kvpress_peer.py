"""Run kvpress's presses on the same model, samples and budgets as ``kvpolicy bench``; write one combined table.

Runs in its own virtualenv (kvpress pins transformers < 5.3): use ``benchmarks/kvpress_env.sh``, which
creates ``.venv-kvpress``, exports the samples with kvpolicy (``python -m kvpolicy.bench.tasks``) and
calls this script. The metrics and the branch protocol are kvpolicy's own
(``kvpolicy/bench/metrics.py``, loaded by file path: it needs torch only), so both sides are scored
identically: one compressed prefill per (press, budget, sample), then continuation / copy / fidelity /
passkey branches, each restored to the post-prefill cache, tokens fed one at a time with true positions.

kvpress prefills with ``model.model(...)`` inside ``with press(model):`` and compresses each layer in a
forward hook; decoding then passes explicit ``position_ids`` (the cache is shorter than the sequence).
The attention mass is not measured for kvpress (it does not expose which positions it kept).

    bash benchmarks/kvpress_env.sh --samples-file S.json --budgets 0.1 0.2 0.5 --out bench-results/peer \
        [--kvpolicy-results bench-results/A-2k/summary.csv ...]
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = Path(os.environ.get("KVPOLICY_CACHE", Path.home() / ".cache" / "kvpolicy")) / "smollm2-135m-instruct"
PRESSES = ("snapkv", "streaming", "knorm", "tova", "expected-attention", "pyramidkv", "kvzip", "adakv-snapkv",
           "adakv-expected-attention", "criticalkv", "think-snapkv", "keydiff", "lagkv", "chunkkv", "leverage",
           "leverage-kv", "random", "finch", "simlayerkv", "h2o")
# presses whose hooks read the attention weights: the model runs them with eager attention
EAGER = ("h2o",)


def load_metrics() -> Any:
    spec = importlib.util.spec_from_file_location("kvpolicy_bench_metrics", ROOT / "kvpolicy" / "bench" / "metrics.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def make_press(name: str, budget: float) -> Any:
    """The kvpress press for ``name`` keeping ``budget`` of the context (``compression_ratio = 1 - budget``)."""
    import kvpress

    ratio = round(1.0 - budget, 6)
    table = {
        "snapkv": lambda: kvpress.SnapKVPress(compression_ratio=ratio),
        "streaming": lambda: kvpress.StreamingLLMPress(compression_ratio=ratio),
        "knorm": lambda: kvpress.KnormPress(compression_ratio=ratio),
        "tova": lambda: kvpress.TOVAPress(compression_ratio=ratio),
        "expected-attention": lambda: kvpress.ExpectedAttentionPress(compression_ratio=ratio),
        "pyramidkv": lambda: kvpress.PyramidKVPress(compression_ratio=ratio),
        "kvzip": lambda: kvpress.KVzipPress(compression_ratio=ratio),
        # AdaKV (kvpress's defaults: alpha_safeguard 0.20) masks what it evicts: the memory stays allocated
        "adakv-snapkv": lambda: kvpress.AdaKVPress(kvpress.SnapKVPress(compression_ratio=ratio)),
        "adakv-expected-attention": lambda: kvpress.AdaKVPress(kvpress.ExpectedAttentionPress(compression_ratio=ratio)),
        "criticalkv": lambda: kvpress.CriticalKVPress(kvpress.SnapKVPress(compression_ratio=ratio)),
        # ThinK on SnapKV's selection, as our think-snapkv (half the key channels, window 32); kvpress zeroes the
        # pruned channels and keeps them in memory
        "think-snapkv": lambda: kvpress.ComposedPress([kvpress.SnapKVPress(compression_ratio=ratio),
                                                       kvpress.ThinKPress(key_channel_compression_ratio=0.5,
                                                                          window_size=32)]),
        "keydiff": lambda: kvpress.KeyDiffPress(compression_ratio=ratio),
        "lagkv": lambda: kvpress.LagKVPress(compression_ratio=ratio),
        # ChunkKV over SnapKV (window 64, kernel 5), 20-token chunks: as our chunkkv preset
        "chunkkv": lambda: kvpress.ChunkKVPress(kvpress.SnapKVPress(compression_ratio=ratio), chunk_length=20),
        "leverage": lambda: kvpress.LeverageScorePress(compression_ratio=ratio),
        "leverage-kv": lambda: kvpress.CURPress(compression_ratio=ratio),
        "random": lambda: kvpress.RandomPress(compression_ratio=ratio, seed=0),
        "finch": lambda: _finch(ratio),
        # SimLayerKV's size follows the data (no ratio); our simlayerkv preset uses the same 0.9 threshold
        "simlayerkv": lambda: kvpress.SimLayerKVPress(lazy_threshold=0.9),
        # H2O as kvpress ships it: ObservedAttentionPress (needs the eager attention weights)
        "h2o": lambda: kvpress.ObservedAttentionPress(compression_ratio=ratio),
    }
    if name not in table:
        raise SystemExit(f"unknown press {name!r}; allowed: {', '.join(table)}")
    return table[name]()


def _finch(ratio: float) -> Any:
    """FinchPress with its question window fixed to the last 32 prompt tokens (our finch preset's window).

    kvpress finds the window from a delimiter token it adds to the tokenizer; our samples carry no delimiter, so
    the window is set directly (the attribute kvpress's delimiter hook would set) and the delimiter id is one no
    prompt holds (-1), so the hook never changes it.
    """
    import kvpress

    press = kvpress.FinchPress(compression_ratio=ratio)
    press.window_size = 32
    press.delimiter_token_id = -1
    return press


def run_one(model: Any, tok: Any, M: Any, press_name: str | None, budget: float, sample: dict[str, Any],
            metrics: set[str], reference: dict[str, Any] | None) -> dict[str, Any]:
    from transformers import DynamicCache

    ids = torch.tensor([sample["context"]])
    n_ctx = ids.shape[1]
    cache = DynamicCache()
    press = make_press(press_name, budget) if press_name else None
    model.set_attn_implementation("eager" if press_name in EAGER else "sdpa")
    with torch.inference_mode():
        t0 = time.perf_counter()
        if press is not None:
            with press(model):
                hidden = model.model(input_ids=ids, past_key_values=cache).last_hidden_state
        else:
            hidden = model.model(input_ids=ids, past_key_values=cache).last_hidden_state
        first = model.lm_head(hidden[:, -1]).float()[0]
        prefill_s = time.perf_counter() - t0
        saved = [(layer.keys, layer.values) for layer in cache.layers]
        kv_bytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in saved)
        pos = [n_ctx]

        def step(t: int) -> torch.Tensor:
            out = model(input_ids=torch.tensor([[t]]), past_key_values=cache, position_ids=torch.tensor([[pos[0]]]),
                        logits_to_keep=1)
            pos[0] += 1
            return out.logits[0, -1].float()

        def fork() -> None:
            for layer, (k, v) in zip(cache.layers, saved):
                layer.keys, layer.values = k, v
            pos[0] = n_ctx

        stop = [tok.eos_token_id] if tok.eos_token_id is not None else []
        raw = M.run_branches(sample, first, step, fork, lambda x: tok.decode(x), metrics, stop)
    full_bytes = 2 * n_ctx * sum(k.shape[0] * k.shape[1] * k.shape[3] * k.element_size() for k, _ in saved)
    row = {"policy": f"kvpress:{press_name}" if press_name else "kvpress:none", "budget": budget if press else 1.0,
           "context": n_ctx, "seed": sample["seed"], "book": sample.get("book", "")}
    row.update(M.summarize(raw, reference))
    row.update({"prefill_s": prefill_s, "kv_bytes": kv_bytes, "kv_bytes_full": full_bytes,
                "kv_ratio": kv_bytes / full_bytes})
    if "passkey_texts" in raw:
        row["passkey_answers"] = " | ".join(t.strip().replace("\n", " ")[:24] for t in raw["passkey_texts"])
    return row, raw


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples-file", required=True, help="samples exported by `python -m kvpolicy.bench.tasks`")
    ap.add_argument("--model", default=str(DEFAULT_MODEL), help="HF model directory (kvpolicy's converted SmolLM2)")
    ap.add_argument("--presses", nargs="+", default=list(PRESSES))
    ap.add_argument("--budgets", nargs="+", type=float, default=[0.1, 0.2, 0.5])
    ap.add_argument("--metrics", nargs="+", default=["continuation", "copy", "fidelity", "passkey"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="bench-results/kvpress")
    ap.add_argument("--kvpolicy-results", nargs="*", default=[], help="summary.csv files of kvpolicy bench runs")
    ap.add_argument("--resume", action="store_true",
                    help="keep the rows already in --out/results.json and measure only the missing ones")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    import kvpress  # noqa: F401  (fail early with a clear import error)
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    M = load_metrics()
    tok = AutoTokenizer.from_pretrained(a.model, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32, local_files_only=True).eval()
    samples = json.loads(Path(a.samples_file).read_text())
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    if a.resume and (out / "results.json").is_file():
        rows = [r for r in json.loads((out / "results.json").read_text())["rows"] if "error" not in r]
    done = {(r["policy"], float(r["budget"]), r.get("seed")) for r in rows}
    meta = {"kvpress": _version("kvpress"), "transformers": transformers.__version__, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "platform": platform.platform(), "cores": os.cpu_count(),
            "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "model": a.model,
            "samples_file": a.samples_file, "presses": a.presses, "budgets": a.budgets}
    metrics = set(a.metrics)
    for sample in samples:
        t0 = time.time()
        ref_row, ref_raw = run_one(model, tok, M, None, 1.0, sample, metrics, None)
        if ("kvpress:none", 1.0, sample["seed"]) not in done:
            rows.append(ref_row)
        print(f"[{time.time() - t0:6.0f}s] reference {sample['n_ctx']} tok: "
              f"copy {ref_row.get('copy_nll', float('nan')):.3f}", flush=True)
        for name in a.presses:
            for b in a.budgets:
                if (f"kvpress:{name}", float(b), sample["seed"]) in done:
                    continue
                t1 = time.time()
                try:
                    row, _ = run_one(model, tok, M, name, b, sample, metrics, ref_raw)
                except Exception as err:  # a press that does not run here is reported, not fatal
                    row = {"policy": f"kvpress:{name}", "budget": b, "context": sample["n_ctx"], "error": repr(err)[:300]}
                for key in ("continuation_nll", "copy_nll"):
                    if key in row and key in ref_row:
                        row[f"{key}_vs_full"] = row[key] - ref_row[key]
                rows.append(row)
                print(f"[{time.time() - t1:6.0f}s] {name} @ {b}: " + ", ".join(
                    f"{k} {row[k]:.3f}" for k in ("copy_nll", "continuation_nll", "greedy_agreement", "passkey_acc")
                    if isinstance(row.get(k), float)) + (f" ERROR {row['error']}" if "error" in row else ""), flush=True)
                _write(rows, meta, out, a.kvpolicy_results)
    _write(rows, meta, out, a.kvpolicy_results)
    return 0


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


def _write(rows: list[dict[str, Any]], meta: dict[str, Any], out: Path, ours: list[str]) -> None:
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with (out / "samples.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    combined = [dict(r, source="kvpress") for r in rows if "error" not in r]
    for path in ours:
        with open(path, newline="") as f:
            combined += [dict(r, source="kvpolicy") for r in csv.DictReader(f)]
    cols = ("copy_nll", "continuation_nll", "greedy_agreement", "greedy_rouge_l", "passkey_acc", "attention_mass",
            "prefill_s", "compress_s", "decode_ms_per_token", "kv_ratio")
    lines = ["| context | source | policy | budget | " + " | ".join(cols) + " |",
             "|---:|:---|:---|---:|" + "---:|" * len(cols)]
    key = lambda r: (int(float(r["context"])), float(r["budget"]) if r["policy"] not in ("full", "kvpress:none")
                     else 9.0, r["source"], r["policy"])  # noqa: E731
    for r in sorted(combined, key=key):
        cells = []
        for c in cols:
            try:
                v = float(r.get(c, "nan"))
                cells.append("-" if math.isnan(v) else f"{v:.3f}")
            except (TypeError, ValueError):
                cells.append("-")
        lines.append(f"| {int(float(r['context']))} | {r['source']} | {r['policy']} | {float(r['budget']):g} | "
                     + " | ".join(cells) + " |")
    (out / "combined.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
