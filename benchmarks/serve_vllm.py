"""Serving benchmark: N concurrent long prompts through vLLM in a fixed KV space, plain vs compressed.

    .venv-vllm/bin/python benchmarks/serve_vllm.py --requests 16 --tokens 2048 --blocks 72 --out bench-results/serve

One engine (engine core in this process, worker in its own, as deployed) serves every configuration; each
configuration switches the policy per request (``SamplingParams.extra_args["kvpolicy"]``). All requests
arrive at once. Reported per configuration: requests/s, output tokens/s, peak KV blocks in use, the most
requests running at once, time to first token (mean, p50, max) and time per output token (mean), and the
compression overhead per prefill (one request alone: its prefill time with and without compression).
Writes ``serve.json``, ``serve.md`` (a table) and ``serve.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def prompts(tokenizer, n: int, tokens: int) -> list[list[int]]:  # noqa: ANN001
    from kvpolicy import data

    text = data.austen_text()
    step = max(1, (len(text) - 20 * tokens) // max(1, n))
    return [tokenizer(text[i * step: i * step + 12 * tokens]).input_ids[:tokens] for i in range(n)]


def run(llm, ids: list[list[int]], kv: dict, max_tokens: int) -> dict:  # noqa: ANN001
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    engine = llm.llm_engine
    sched = engine.engine_core.engine_core.scheduler
    pool = sched.kv_cache_manager.block_pool
    sp = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, extra_args={"kvpolicy": kv})
    t0 = time.perf_counter()
    for i, p in enumerate(ids):
        engine.add_request(f"r{i}-{time.time_ns()}", TokensPrompt(prompt_token_ids=p), sp)
    first: dict[str, float] = {}
    done: dict[str, float] = {}
    peak_blocks = peak_running = 0
    preempted0 = sched.stats.preempted
    while engine.has_unfinished_requests():
        outs = engine.step()
        now = time.perf_counter()
        peak_running = max(peak_running, len(sched.running))
        peak_blocks = max(peak_blocks, pool.num_gpu_blocks - 1 - pool.get_num_free_blocks())
        for o in outs:
            if o.outputs and o.outputs[0].token_ids and o.request_id not in first:
                first[o.request_id] = now
            if o.finished:
                done[o.request_id] = now
    wall = time.perf_counter() - t0
    ttft = [first[r] - t0 for r in done]
    tpot = [(done[r] - first[r]) / (max_tokens - 1) for r in done]
    return {"wall_s": wall, "requests_per_s": len(ids) / wall, "output_tokens_per_s": len(ids) * max_tokens / wall,
            "peak_blocks": peak_blocks, "peak_running": peak_running, "ttft_mean_s": statistics.mean(ttft),
            "ttft_p50_s": statistics.median(ttft), "ttft_max_s": max(ttft), "tpot_mean_s": statistics.mean(tpot),
            "preempted": sched.stats.preempted - preempted0}


def prefill_seconds(llm, ids: list[int], configs: list[dict], repeats: int) -> list[list[float]]:  # noqa: ANN001
    """Times of one prefill alone (``max_tokens=1``), per configuration and repeat, the configurations
    interleaved within each repeat."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    times: list[list[float]] = [[] for _ in configs]
    for _ in range(repeats):
        for i, kv in enumerate(configs):
            sp = SamplingParams(max_tokens=1, temperature=0, extra_args={"kvpolicy": kv})
            t = time.perf_counter()
            llm.generate([TokensPrompt(prompt_token_ids=ids)], sp, use_tqdm=False)
            times[i].append(time.perf_counter() - t)
    return times


def prefill_overhead(llm, ids: list[int], policy: str, repeats: int) -> dict:  # noqa: ANN001
    """One prompt's prefill alone, plain and with ``policy`` at 0.2, ``repeats`` interleaved pairs: the medians
    and the median of each pair's own relative difference (the drift between pairs cancels)."""
    plain_t, comp_t = prefill_seconds(llm, ids, [{"enabled": False}, {"policy": policy, "budget": 0.2}], repeats)
    return {"prefill_plain_s": statistics.median(plain_t), "prefill_compressed_s": statistics.median(comp_t),
            "overhead_pct": 100 * statistics.median((c - p) / p for c, p in zip(comp_t, plain_t)),
            "plain_times_s": plain_t, "compressed_times_s": comp_t}


def aggregate(name: str, runs: list[dict], plain_runs: list[dict]) -> dict:
    """One row from a configuration's rounds: medians of the rates and times, the largest peaks, the sum of the
    preemptions; ``x_plain`` is the median over rounds of the output-token rate over plain's in the same round."""
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0] if isinstance(runs[0][k], float)}
    row = {**med, "peak_blocks": max(r["peak_blocks"] for r in runs), "peak_running": max(r["peak_running"] for r in runs),
           "preempted": sum(r["preempted"] for r in runs), "config": name, "rounds": len(runs),
           "x_plain": statistics.median(r["output_tokens_per_s"] / p["output_tokens_per_s"]
                                        for r, p in zip(runs, plain_runs))}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=2048, help="prompt length")
    ap.add_argument("--max-tokens", type=int, default=256, help="output tokens per request")
    ap.add_argument("--blocks", type=int, default=72, help="KV blocks in the pool (128 tokens each)")
    ap.add_argument("--policy", default="snapkv")
    ap.add_argument("--budgets", default="1.0,0.5,0.2")
    ap.add_argument("--repeats", type=int, default=7, help="prefill-overhead repeats")
    ap.add_argument("--rounds", type=int, default=1,
                    help="runs of every configuration, in turn (odd rounds in reverse order): medians are reported")
    ap.add_argument("--out", default="bench-results/serve")
    ap.add_argument("--overhead-only", action="store_true",
                    help="only the compression overhead per prefill (--repeats interleaved pairs), to overhead.json")
    a = ap.parse_args()

    from transformers import AutoTokenizer
    from vllm import LLM

    from kvpolicy import models

    models.load_default()
    path = str(models.cache_dir() / models.DEFAULT_NAME)
    tok = AutoTokenizer.from_pretrained(path)
    ids = prompts(tok, a.requests, a.tokens)
    llm = LLM(model=path, dtype="float32", enforce_eager=True, max_model_len=a.tokens + a.max_tokens + 64,
              num_gpu_blocks_override=a.blocks, max_num_seqs=max(16, a.requests),
              enable_prefix_caching=False,  # every configuration prefills every prompt (no hits from earlier runs)
              additional_config={"kvpolicy": {"enabled": False}})
    if a.overhead_only:
        run(llm, ids[:2], {"enabled": False}, 4)  # warm-up
        overhead = prefill_overhead(llm, ids[0], a.policy, a.repeats)
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "overhead.json").write_text(json.dumps({"policy": a.policy, "prompt_tokens": a.tokens, **overhead},
                                                      indent=1))
        print(json.dumps(overhead))
        return
    configs = [("plain vLLM", {"enabled": False})] + [
        (f"{a.policy} {b}", {"policy": a.policy, "budget": float(b)}) for b in a.budgets.split(",")]
    runs: dict[str, list[dict]] = {name: [] for name, _ in configs}
    run(llm, ids[:2], {"enabled": False}, 4)  # warm-up
    for rnd in range(a.rounds):
        for name, kv in (configs if rnd % 2 == 0 else configs[::-1]):
            r = run(llm, ids, kv, a.max_tokens)
            r["config"], r["round"] = name, rnd
            runs[name].append(r)
            print(json.dumps(r), flush=True)
    plain_runs = runs[configs[0][0]]
    rows = [aggregate(name, runs[name], plain_runs) for name, _ in configs]
    overhead = prefill_overhead(llm, ids[0], a.policy, a.repeats)
    plain_p, comp_p = overhead["prefill_plain_s"], overhead["prefill_compressed_s"]
    print(json.dumps(overhead), flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"requests": a.requests, "prompt_tokens": a.tokens, "output_tokens": a.max_tokens, "kv_blocks": a.blocks,
            "block_size": llm.llm_engine.engine_core.engine_core.scheduler.kv_block_size, "policy": a.policy,
            "cpu_threads": os.cpu_count()}
    (out / "serve.json").write_text(json.dumps({"meta": meta, "rows": rows, "prefill": overhead,
                                                "runs": [r for name, _ in configs for r in runs[name]]}, indent=1))
    lines = [f"{a.requests} requests × {a.tokens} prompt tokens, {a.max_tokens} output tokens each, all arriving "
             f"at once; prefix caching off; KV pool {a.blocks} blocks of {meta['block_size']} tokens; SmolLM2-135M fp32, "
             f"vllm-cpu 0.32; medians of {a.rounds} round(s) (× plain: the median of each round's ratio).",
             "", "| configuration | req/s | output tok/s | × plain | peak KV blocks | most running | TTFT mean (s) | "
             "TTFT max (s) | TPOT mean (ms) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['requests_per_s']:.3f} | {r['output_tokens_per_s']:.1f} | "
                     f"{r['x_plain']:.2f} | {r['peak_blocks']} | "
                     f"{r['peak_running']} | {r['ttft_mean_s']:.1f} | {r['ttft_max_s']:.1f} | "
                     f"{1000 * r['tpot_mean_s']:.0f} |")
    lines += ["", f"Compression overhead per prefill ({a.tokens} tokens, one request alone, {a.repeats} interleaved "
              f"repeats): {plain_p:.2f} s plain, {comp_p:.2f} s with {a.policy} 0.2 (medians); the median of each "
              f"repeat's own difference: {overhead['overhead_pct']:+.1f} %."]
    (out / "serve.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
        names = [r["config"] for r in rows]
        for ax, key, label in zip(axes, ("output_tokens_per_s", "peak_running", "tpot_mean_s"),
                                  ("output tokens / s", "most requests running at once", "time per output token (s)")):
            ax.bar(names, [r[key] for r in rows], color=["#888"] + ["#3a7"] * (len(rows) - 1))
            ax.set_title(label, fontsize=10)
            ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        fig.tight_layout()
        fig.savefig(out / "serve.png", dpi=110)
    except ImportError:
        pass


if __name__ == "__main__":
    main()
