"""Cost of kvpolicy's OpenTelemetry instrumentation on a SmolLM2 prefill.

Times one prefill forward of SmolLM2-135M (2048 Austen tokens, ``snapkv`` at 0.2: 30 compressions)
in three modes, interleaved run by run so that machine load affects them alike:

* ``off``: the instrumentation replaced by bare context managers (the event is still filled: the
  cache report needs it) -- the reference;
* ``api``: as shipped, no SDK configured (OpenTelemetry API no-op);
* ``sdk``: SDK with the in-memory span exporter and metric reader (``telemetry_setup.in_memory()``).

It reports the median of ``--runs`` timings (wall clock and process CPU) per mode and the overhead
against ``off``. Because end-to-end timings on a shared machine are noisy at the 1 % level, it also
measures the instrumentation *in situ*: the time spent entering and leaving the ``generate_span`` and
every ``compress_span`` (their bodies excluded) during the same prefills, minus the same for ``off``,
as a share of the median ``off`` prefill: a direct, low-noise figure.

    python benchmarks/bench_tracing.py --runs 7 --out docs/results/tracing.md
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import torch

import kvpolicy
from kvpolicy import data, models, telemetry_setup, tracing

MODES = ("off", "api", "sdk")


@contextmanager
def _bare_generate(policy: str, report: object = None) -> Iterator[None]:
    yield None


@contextmanager
def _bare_compress(event: tracing.CompressionEvent) -> Iterator[tracing.CompressionEvent]:
    t0 = time.perf_counter()
    try:
        yield event
    finally:
        event.seconds = time.perf_counter() - t0


class _Overhead:
    """Wraps a span context manager factory; sums the time spent in its enter and exit (body excluded)."""

    def __init__(self, factory: object) -> None:
        self.factory = factory
        self.seconds = 0.0

    @contextmanager
    def __call__(self, *args: object, **kwargs: object) -> Iterator[object]:
        t0 = time.perf_counter()
        cm = self.factory(*args, **kwargs)
        value = cm.__enter__()
        self.seconds += time.perf_counter() - t0
        try:
            yield value
        except BaseException:
            t1 = time.perf_counter()
            suppressed = cm.__exit__(*sys.exc_info())
            self.seconds += time.perf_counter() - t1
            if not suppressed:
                raise
        else:
            t1 = time.perf_counter()
            cm.__exit__(None, None, None)
            self.seconds += time.perf_counter() - t1


@contextmanager
def measured(mode: str) -> Iterator[list[_Overhead]]:
    """Inside ``mode_context(mode)``: time the enter/exit of every generate and compress span."""
    saved = tracing.generate_span, tracing.compress_span
    gen, comp = _Overhead(saved[0]), _Overhead(saved[1])
    tracing.generate_span, tracing.compress_span = gen, comp
    try:
        yield [gen, comp]
    finally:
        tracing.generate_span, tracing.compress_span = saved


@contextmanager
def mode_context(mode: str) -> Iterator[telemetry_setup.Telemetry | None]:
    """Switch the instrumentation to ``mode`` for the block."""
    saved = tracing.generate_span, tracing.compress_span
    if mode == "off":
        tracing.generate_span, tracing.compress_span = _bare_generate, _bare_compress
        try:
            yield None
        finally:
            tracing.generate_span, tracing.compress_span = saved
    elif mode == "api":
        assert tracing.get_providers() == (None, None)
        yield None
    elif mode == "sdk":
        tel = telemetry_setup.in_memory()
        try:
            yield tel
        finally:
            tel.shutdown()
    else:
        raise ValueError(f"unknown mode {mode!r}; allowed: {', '.join(MODES)}")


def prefill_seconds(model: torch.nn.Module, ids: torch.Tensor, policy: kvpolicy.Policy, mode: str
                    ) -> tuple[float, float, float]:
    """Wall-clock and process CPU seconds of one compressed prefill in ``mode``, and the seconds spent
    entering and leaving its spans."""
    with mode_context(mode) as tel, measured(mode) as spans, torch.inference_mode():
        t0, c0 = time.perf_counter(), time.process_time()
        with kvpolicy.compress(model, policy) as cache:
            model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        if tel is not None:
            n = len([s for s in tel.finished_spans() if s.name == tracing.COMPRESS_SPAN])
            assert n == len(cache.layers), f"expected {len(cache.layers)} compress spans, got {n}"
    return dt, dc, sum(s.seconds for s in spans)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--budget", type=float, default=0.2)
    ap.add_argument("--out", default=None, help="write the Markdown table here (e.g. docs/results/tracing.md)")
    args = ap.parse_args()

    model, tok = models.load_default()
    text = data.austen_text("Pride & Prejudice")
    ids = torch.tensor([tok(text[:60_000], add_special_tokens=False)["input_ids"][: args.tokens]])
    assert ids.shape[1] == args.tokens
    policy = kvpolicy.load_policy("snapkv", budget=args.budget)
    n_layers = model.config.num_hidden_layers

    prefill_seconds(model, ids, policy, "off")  # warm-up
    times: dict[str, list[float]] = {m: [] for m in MODES}
    cpu: dict[str, list[float]] = {m: [] for m in MODES}
    spans: dict[str, list[float]] = {m: [] for m in MODES}
    for r in range(args.runs):
        order = MODES[r % 3:] + MODES[: r % 3]  # rotate who goes first
        for m in order:
            dt, dc, ds = prefill_seconds(model, ids, policy, m)
            times[m].append(dt)
            cpu[m].append(dc)
            spans[m].append(ds)
        print(f"run {r + 1}/{args.runs}: " + ", ".join(
            f"{m} {times[m][-1]:.3f} s (cpu {cpu[m][-1]:.3f} s, spans {spans[m][-1] * 1e3:.2f} ms)" for m in MODES),
            flush=True)
        table = render(args, n_layers, r + 1, times, cpu, spans)
        if args.out:  # rewritten after every run: a cut-short benchmark still leaves its figures
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(table, encoding="utf-8")
    print(table)
    if args.out:
        print(f"written to {args.out}")


def render(args: argparse.Namespace, n_layers: int, done: int, times: dict[str, list[float]],
           cpu: dict[str, list[float]], spans: dict[str, list[float]]) -> str:
    """The Markdown results page for the runs done so far."""
    med = {m: statistics.median(v) for m, v in times.items()}
    med_cpu = {m: statistics.median(v) for m, v in cpu.items()}
    instr = {m: statistics.median(v) for m, v in spans.items()}

    rows = []
    for m in MODES:
        e2e = (med[m] / med["off"] - 1) * 100
        e2e_cpu = (med_cpu[m] / med_cpu["off"] - 1) * 100
        direct = (instr[m] - instr["off"]) / med["off"] * 100
        rows.append(f"| {m} | {med[m]:.3f} | {min(times[m]):.3f} | {e2e:+.2f} % | {med_cpu[m]:.3f} | "
                    f"{e2e_cpu:+.2f} % | {(instr[m] - instr['off']) * 1e6:.0f} | {direct:.2g} % |")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    table = "\n".join([
        f"# Tracing overhead: SmolLM2-135M prefill, {args.tokens} tokens, snapkv at {args.budget}",
        "",
        f"Measured {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC with `python benchmarks/bench_tracing.py "
        f"--runs {args.runs}` ({done} runs done) on {platform.machine()} ({os.cpu_count()} CPUs visible, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads, load average {load:.1f} at the end: the "
        f"machine was shared). {n_layers} compressions per prefill.",
        "",
        "| mode | median prefill (s) | best (s) | wall vs off | median CPU (s) | CPU vs off | "
        "instrumentation per prefill (µs) | instrumentation / prefill |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "* `off`: instrumentation replaced by bare timers (reference); `api`: as shipped, no SDK "
        "(OpenTelemetry API no-op); `sdk`: SDK with the in-memory span exporter and metric reader.",
        "* Wall / CPU vs off: medians of the interleaved runs (CPU: `time.process_time()`, all threads of "
        "the process) against `off`; on a shared machine their noise (compare `best` with the median) can be "
        "larger than the effect.",
        "* Instrumentation per prefill: time spent entering and leaving the `kvpolicy.generate` span and the "
        f"{n_layers} `kvpolicy.compress` spans (attributes, report and metrics included, span bodies excluded) "
        "during the same prefills, median over the runs, minus the same for `off` (bare timers); last "
        "column: that cost as a share of the median `off` prefill.",
        "",
    ])
    return table


if __name__ == "__main__":
    main()
