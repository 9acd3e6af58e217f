"""Quality metrics and the scoring protocol of ``kvpolicy bench``.

This module depends on torch only (no kvpolicy import), so the kvpress peer script
(``benchmarks/kvpress_peer.py``, run in its own virtualenv with an older transformers) loads it by file
path and measures exactly the same things the same way.

The protocol: a context is prefilled once (compressed by the method under test); then several *branches*
continue from that same compressed state, each restored before it runs (``fork()``):

- ``continuation``: the true next tokens of the book, scored one at a time (NLL, perplexity);
- ``copy``: a span of the context repeated after it; after a short cue, the NLL of the rest of the span;
- ``fidelity``: greedy tokens, compared later with the full cache's (token agreement, ROUGE-L);
- ``passkey``: one question per needle planted in the context, greedy answer, exact match.

``step(token_id)`` feeds one token at its true position and returns next-token logits ``[V]``.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

StepFn = Callable[[int], Tensor]


def token_nll(logits: Tensor, target: int) -> float:
    """Negative log-likelihood (nats) of ``target`` under ``logits [V]`` (computed in fp32)."""
    return float(-torch.log_softmax(logits.float(), dim=-1)[target])


def teacher_forced_nll(step: StepFn, first_logits: Tensor, tokens: Sequence[int]) -> list[float]:
    """NLL of each of ``tokens`` given everything before it, feeding them one at a time.

    ``first_logits [V]`` predicts ``tokens[0]``; the last token is never fed (nothing left to score).
    """
    out: list[float] = []
    logits = first_logits
    for i, t in enumerate(tokens):
        out.append(token_nll(logits, int(t)))
        if i + 1 < len(tokens):
            logits = step(int(t))
    return out


def greedy_tokens(step: StepFn, first_logits: Tensor, n: int, stop_ids: Sequence[int] = ()) -> list[int]:
    """Up to ``n`` greedy tokens starting from ``first_logits``; stops after a token in ``stop_ids``."""
    out: list[int] = []
    logits = first_logits
    for i in range(n):
        t = int(logits.argmax())
        out.append(t)
        if t in stop_ids or i + 1 == n:
            break
        logits = step(t)
    return out


def mean(xs: Sequence[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else float("nan")


def perplexity(nlls: Sequence[float]) -> float:
    """``exp`` of the mean NLL."""
    return math.exp(mean(nlls)) if nlls else float("nan")


def lcs_length(a: Sequence[Any], b: Sequence[Any]) -> int:
    """Length of the longest common subsequence (O(len(a)·len(b)) time, O(len(b)) memory)."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0] * (len(b) + 1)
        for j, y in enumerate(b, start=1):
            cur[j] = prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1])
        prev = cur
    return prev[-1]


def rouge_l(reference: Sequence[Any], candidate: Sequence[Any]) -> float:
    """ROUGE-L F1 between two token sequences: harmonic mean of LCS precision and recall (0 if either is empty)."""
    lcs = lcs_length(reference, candidate)
    if lcs == 0:
        return 0.0
    p, r = lcs / len(candidate), lcs / len(reference)
    return 2 * p * r / (p + r)


def token_agreement(reference: Sequence[Any], candidate: Sequence[Any]) -> float:
    """Share of the reference's positions where the candidate has the same token (missing = different)."""
    if not reference:
        return float("nan")
    return sum(1 for i, t in enumerate(reference) if i < len(candidate) and candidate[i] == t) / len(reference)


def prefix_match(reference: Sequence[Any], candidate: Sequence[Any]) -> int:
    """Number of leading tokens the candidate shares with the reference."""
    n = 0
    for x, y in zip(reference, candidate):
        if x != y:
            break
        n += 1
    return n


def passkey_correct(generated_text: str, answer: str) -> bool:
    """Exact match: the first number in the generated text equals ``answer``."""
    m = re.search(r"\d+", generated_text)
    return m is not None and m.group(0) == answer


class TimedStep:
    """Wraps a step function and records the wall time of each call (for decode ms/token)."""

    def __init__(self, step: StepFn) -> None:
        self.step = step
        self.times: list[float] = []

    def __call__(self, token: int) -> Tensor:
        t0 = time.perf_counter()
        out = self.step(token)
        self.times.append(time.perf_counter() - t0)
        return out

    def ms_per_token(self) -> float:
        return 1e3 * mean(self.times) if self.times else float("nan")


def run_branches(sample: dict[str, Any], first_logits: Tensor, step: StepFn, fork: Callable[[], None],
                 decode: Callable[[list[int]], str], metrics: set[str], stop_ids: Sequence[int] = (),
                 on_branch: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the requested branches of one sample from the same compressed state.

    ``sample`` is a task dict (see :mod:`kvpolicy.bench.tasks`): ``continuation``, ``copy_span``,
    ``copy_cue``, ``gen_tokens``, ``needles`` (each with ``question`` ids and ``answer``).
    ``fork()`` restores the state right after the prefill. Returns raw per-sample results: NLL lists,
    greedy tokens, passkey hits, decode ms/token (measured on the continuation branch, else any branch).
    """
    out: dict[str, Any] = {}
    timed = TimedStep(step)
    first = True

    def begin(name: str) -> None:
        nonlocal first
        if not first:
            fork()
        first = False
        if on_branch is not None:
            on_branch(name)

    if "continuation" in metrics:
        begin("continuation")
        out["continuation_nll"] = teacher_forced_nll(timed, first_logits, sample["continuation"])
    if "copy" in metrics:
        begin("copy")
        nll = teacher_forced_nll(timed, first_logits, sample["copy_span"])
        out["copy_nll"] = nll[int(sample["copy_cue"]):]
    if "fidelity" in metrics:
        begin("fidelity")
        out["greedy"] = greedy_tokens(timed, first_logits, int(sample["gen_tokens"]))
    if "passkey" in metrics:
        hits, texts = [], []
        for needle in sample["needles"]:
            begin("passkey")
            logits = first_logits
            for t in needle["question"]:
                logits = timed(int(t))
            ans = greedy_tokens(timed, logits, int(sample.get("answer_tokens", 8)), stop_ids)
            text = decode(ans)
            texts.append(text)
            hits.append(passkey_correct(text, needle["answer"]))
        out["passkey_hits"] = hits
        out["passkey_texts"] = texts
    out["decode_ms_per_token"] = timed.ms_per_token()
    return out


def summarize(raw: dict[str, Any], reference: dict[str, Any] | None) -> dict[str, float]:
    """Per-sample figures from :func:`run_branches` output, compared with the full cache's ``reference``."""
    row: dict[str, float] = {}
    if "continuation_nll" in raw:
        row["continuation_nll"] = mean(raw["continuation_nll"])
        row["continuation_ppl"] = perplexity(raw["continuation_nll"])
    if "copy_nll" in raw:
        row["copy_nll"] = mean(raw["copy_nll"])
    if "passkey_hits" in raw:
        row["passkey_acc"] = mean([float(h) for h in raw["passkey_hits"]])
    if "greedy" in raw and reference is not None and "greedy" in reference:
        row["greedy_agreement"] = token_agreement(reference["greedy"], raw["greedy"])
        row["greedy_rouge_l"] = rouge_l(reference["greedy"], raw["greedy"])
        row["greedy_prefix"] = float(prefix_match(reference["greedy"], raw["greedy"]))
    row["decode_ms_per_token"] = raw.get("decode_ms_per_token", float("nan"))
    return row
