"""Speed and memory, measured in a fresh subprocess per configuration.

A fresh process makes the peak resident memory of one configuration its own: the worker loads the model,
warms up on a short input, returns freed memory to the OS (``malloc_trim``), then times the prefill of an
``n``-token Austen context and ``decode`` one-token steps while a thread samples the resident set size.

Figures: ``prefill_s`` (wall) and ``prefill_cpu_s`` (process CPU time: on a machine shared with other
jobs it is steadier than wall time), ``compress_s`` (kvpolicy's own compression time from ``cache.report()``),
``decode_ms_per_token`` (and ``decode_cpu_ms_per_token``), ``kv_bytes`` / ``kv_bytes_full``, ``peak_rss_mb`` (``ru_maxrss`` of the worker,
model included) and ``prefill_peak_delta_mb`` (sampled peak RSS during the prefill minus the RSS just
before it: the prefill's working memory, KV cache included).

``policy="plain"`` runs plain transformers (a ``DynamicCache``, no kvpolicy) for comparison.

Run one configuration by hand::

    python -m kvpolicy.bench.speed '{"policy": "snapkv", "budget": 0.2, "n_ctx": 2000}'
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import platform
import random
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

PLAIN = "plain"


def timed(fn: Callable[..., Any], key: str, spent: dict[str, float]) -> Callable[..., Any]:
    """``fn`` wrapped to add the process CPU time of each call to ``spent[key]`` (a profile of named parts
    without a profiler's per-call overhead)."""
    def run(*args: Any, **kwargs: Any) -> Any:
        t = time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[key] = spent.get(key, 0.0) + time.process_time() - t
    return run


def rss_bytes() -> int:
    """Current resident set size of this process (Linux ``/proc/self/statm``; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def trim_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``; no-op elsewhere)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakSampler:
    """Samples the RSS every ``interval`` seconds in a thread; ``peak`` is the largest value seen."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> PeakSampler:
        self.peak = rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def machine_info() -> dict[str, Any]:
    """Machine, library versions and thread count, for result files."""
    import torch
    import transformers

    import kvpolicy

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as f:
            mem_kb = int(next(ln.split()[1] for ln in f if ln.startswith("MemTotal")))
    except (OSError, StopIteration, ValueError):
        mem_kb = 0
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "memory_gib": round(mem_kb / 2**20, 1), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "kvpolicy": kvpolicy.__version__,
            "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def context_ids(tok: Any, n_ctx: int, seed: int) -> list[int]:
    """``n_ctx`` tokens of Austen text (the same stretch for every policy at a given seed)."""
    from kvpolicy.bench.tasks import book_tokens

    ids, _ = book_tokens(tok, n_ctx, random.Random(seed * 7919 + n_ctx))
    return ids


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure one configuration in this process. ``spec``: policy, budget, n_ctx, decode, seed, model."""
    import torch
    from transformers import DynamicCache

    from kvpolicy import models
    from kvpolicy.bench.runner import policy_for
    from kvpolicy.compat import cache_kwargs  # for the plain DynamicCache: the model's own keyword
    from kvpolicy.integrate import compress

    torch.set_grad_enabled(False)
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    name, budget, n_ctx = spec["policy"], spec.get("budget"), int(spec["n_ctx"])
    n_dec = int(spec.get("decode", 32))
    model, tok = models.load_any(spec.get("model"))
    ids = torch.tensor([context_ids(tok, n_ctx + n_dec, int(spec.get("seed", 0)))])
    ctx, nxt = ids[:, :n_ctx], ids[0, n_ctx:].tolist()

    def run(x: torch.Tensor, follow: list[int]) -> dict[str, Any]:
        if name == PLAIN:
            cache: Any = DynamicCache()
            manager: Any = None
        else:
            manager = compress(model, policy_for(name, budget))
            cache = manager.__enter__()
        try:
            trim_memory()
            before = rss_bytes()
            with torch.inference_mode(), PeakSampler() as sampler:
                t0, c0 = time.perf_counter(), time.process_time()
                model(input_ids=x, logits_to_keep=1, **cache_kwargs(model, cache))
                prefill_s, prefill_cpu = time.perf_counter() - t0, time.process_time() - c0
            times = []
            c0 = time.process_time()
            with torch.inference_mode():
                for t in follow:
                    t0 = time.perf_counter()
                    model(input_ids=torch.tensor([[t]]), logits_to_keep=1, **cache_kwargs(model, cache))
                    times.append(time.perf_counter() - t0)
            n = max(1, len(times))
            out = {"prefill_s": prefill_s, "prefill_cpu_s": prefill_cpu,
                   "prefill_peak_delta_mb": (sampler.peak - before) / 2**20,
                   "decode_ms_per_token": 1e3 * sum(times) / n,
                   "decode_cpu_ms_per_token": 1e3 * (time.process_time() - c0) / n}
            if name == PLAIN:
                kv = sum(lay.keys.numel() * lay.keys.element_size() * 2 for lay in cache.layers)
                out.update(compress_s=0.0, kv_bytes=kv, kv_bytes_full=kv)
            else:
                rep = cache.report()
                out.update(compress_s=rep.seconds, kv_bytes=rep.bytes_now, kv_bytes_full=rep.bytes_full)
            return out
        finally:
            if manager is not None:
                manager.__exit__(None, None, None)

    run(ctx[:, :64], nxt[:2])  # warm-up: first-call allocations, lazy initialisation
    res = run(ctx, nxt)
    res.update(policy=name, budget=budget if name not in (PLAIN, "full") else 1.0, context=n_ctx,
               decode_tokens=n_dec, threads=torch.get_num_threads(), peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return res


def measure_isolated(spec: dict[str, Any], timeout: float = 1800) -> dict[str, Any]:
    """:func:`measure` in a fresh Python subprocess; returns its figures or ``{"error": ...}``."""
    proc = subprocess.run([sys.executable, "-m", "kvpolicy.bench.speed", json.dumps(spec)], capture_output=True,
                          text=True, timeout=timeout)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {"policy": spec["policy"], "budget": spec.get("budget"), "context": spec["n_ctx"],
            "error": (proc.stderr or proc.stdout).strip()[-500:]}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    print(json.dumps(measure(json.loads(args[0]))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
