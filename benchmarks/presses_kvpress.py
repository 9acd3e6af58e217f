"""Kept entries of kvpress's presses and of this package's presets, side by side on the same model and prompt.

Two halves, because kvpress pins an older transformers and lives in its own virtualenv
(``bash benchmarks/kvpress_env.sh --setup-only`` creates ``.venv-kvpress``):

    python benchmarks/presses_kvpress.py prompt --out /tmp/cmp            # kvpolicy env: the prompt ids
    .venv-kvpress/bin/python benchmarks/presses_kvpress.py kvpress --out /tmp/cmp   # kvpress's kept entries
    python benchmarks/presses_kvpress.py compare --out /tmp/cmp           # ours, and the table

The prompt is the test suite's SmolLM2 passage (Pride & Prejudice, 1 500 tokens). kvpress keeps
``int(L * (1 - compression_ratio))`` entries per head (``compression_ratio = 1 - budget``), which floating
point makes one less than ``floor(L * budget)`` for some ``L``; the kvpolicy side is given exactly that
many (``budget: {tokens: n}``), so any difference is a difference of scores. kvpress's kept indices are
read from the same ``score`` + ``topk`` as its ``ScorerPress.compress``, inside its own forward hook.

The kvpress half imports torch, transformers and kvpress only (it runs where kvpolicy is not installed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

MODEL = Path(os.environ.get("KVPOLICY_CACHE", Path.home() / ".cache" / "kvpolicy")) / "smollm2-135m-instruct"
BUDGET = 0.2
#: name: (kvpress press, its parameters, kvpolicy preset or (preset, scorer parameters), what is compared)
PAIRS: dict[str, tuple[str, dict[str, Any], Any, str]] = {
    "expected-attention": ("ExpectedAttentionPress", {}, "expected-attention", "same method"),
    "expected-attention-theta1e4": ("ExpectedAttentionPress", {}, ("expected-attention", {"rope_theta": 10000.0}),
                                    "same method, wrong RoPE base (10000 instead of 100000)"),
    "keydiff": ("KeyDiffPress", {}, "keydiff", "same method"),
    "lagkv": ("LagKVPress", {}, "lagkv", "same method"),
    "leverage-d64": ("LeverageScorePress", {"sketch_dimension": 64}, "leverage",
                     "same method: a sketch as wide as the head is exact (leverage is invariant under it)"),
    "leverage": ("LeverageScorePress", {}, "leverage", "exact leverage vs kvpress's default 48-dim Gaussian sketch"),
    "leverage-kv": ("CURPress", {}, "leverage-kv", "exact leverage product vs kvpress's windowed squared-norm proxy"),
}
#: pairs that reuse another pair's kvpress run
SAME_RUN = {"expected-attention-theta1e4": "expected-attention"}


def kvpress_side(out: Path) -> None:
    """Run each kvpress press on the prompt; write ``kvpress.json``: ``{name: {"n_kept": n, "kept": [[[..]]]}}``."""
    import kvpress
    from transformers import AutoModelForCausalLM, DynamicCache

    ids = torch.tensor([json.loads((out / "prompt.json").read_text())])
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32, local_files_only=True).eval()
    result: dict[str, Any] = {}
    for name, (cls_name, params, _, _) in PAIRS.items():
        if name in SAME_RUN:
            continue
        press = getattr(kvpress, cls_name)(compression_ratio=round(1.0 - BUDGET, 6), **params)
        kept: list[list[list[int]]] = []

        def compress(module, hidden_states, keys, values, attentions, kwargs, press=press, kept=kept):
            scores = press.score(module, hidden_states, keys, values, attentions, kwargs)
            n_kept = int(keys.shape[2] * (1 - press.compression_ratio))  # ScorerPress.compress
            idx = scores.topk(n_kept, dim=-1).indices
            kept.append(idx[0].sort(dim=-1).values.tolist())
            gather = idx.unsqueeze(-1).expand(-1, -1, -1, keys.shape[-1])
            return keys.gather(2, gather).contiguous(), values.gather(2, gather).contiguous()

        press.compress = compress
        torch.manual_seed(0)  # LeverageScorePress / CURPress draw random sketches
        with torch.inference_mode(), press(model):
            model.model(input_ids=ids, past_key_values=DynamicCache())
        result[name] = {"n_kept": len(kept[0][0]), "kept": kept, "press": cls_name}
        print(f"{name}: {len(kept)} layers, {len(kept[0][0])} kept per head", flush=True)
    result["_meta"] = {"kvpress": _version("kvpress"), "transformers": _version("transformers"),
                       "torch": torch.__version__}
    (out / "kvpress.json").write_text(json.dumps(result))


def prompt_side(out: Path) -> None:
    from kvpolicy import data, models

    _, tok = models.load_default()
    text = data.austen_text("Pride & Prejudice")
    ids = tok(text[5000:30000], add_special_tokens=False)["input_ids"][:1500]  # tests/conftest.py: smol_passage
    out.mkdir(parents=True, exist_ok=True)
    (out / "prompt.json").write_text(json.dumps(ids))


def kept_positions(model: Any, ids: torch.Tensor, policy: Any, n_kept: int) -> list[list[list[int]]]:
    """Kept positions per layer and KV head after one compressed prefill keeping ``n_kept`` entries per head;
    ``policy`` is a preset name or ``(preset, scorer parameters to change)``."""
    import kvpolicy

    name, params = policy if isinstance(policy, tuple) else (policy, {})
    cfg = kvpolicy.load_policy(name).to_config()
    cfg["scorer"].update(params)
    cfg["budget"] = {**{k: v for k, v in cfg["budget"].items() if k != "ratio"}, "tokens": n_kept}
    with torch.inference_mode(), kvpolicy.compress(model, cfg) as cache:
        model(input_ids=ids, cache=cache)
    return [layer.positions[0].tolist() for layer in cache.layers]


def compare_side(out: Path) -> str:
    """Our kept entries for each pair, the mismatch table (Markdown) written to ``compare.md``."""
    from kvpolicy import models

    model, _ = models.load_default()
    ids = torch.tensor([json.loads((out / "prompt.json").read_text())])
    theirs = json.loads((out / "kvpress.json").read_text())
    lines = [f"kvpress {theirs['_meta']['kvpress']} (transformers {theirs['_meta']['transformers']}) vs kvpolicy, "
             f"SmolLM2, {ids.shape[1]}-token prompt, budget {BUDGET}: kept positions of kvpolicy not kept by kvpress, "
             f"summed over the 3 KV heads, per layer", "",
             "| kvpolicy | kvpress | compared | kept / head | mismatches (all layers) | share | per layer, from layer 0 |",
             "|---|---|---|---:|---:|---:|---|"]
    for name, (cls_name, params, policy, what) in PAIRS.items():
        ref = theirs[SAME_RUN.get(name, name)]
        ours = kept_positions(model, ids, policy, ref["n_kept"])
        per_layer = [sum(len(set(o) - set(t)) for o, t in zip(ol, tl)) for ol, tl in zip(ours, ref["kept"])]
        total = sum(per_layer)
        share = total / (len(per_layer) * len(ours[0]) * ref["n_kept"])
        label = f"`{policy}`" if isinstance(policy, str) else f"`{policy[0]}`, {policy[1]}"
        press = f"`{cls_name}`" + (f", {params}" if params else "")
        lines.append(f"| {label} | {press} | {what} | "
                     f"{ref['n_kept']} | {total} | {share:.1%} | {' '.join(map(str, per_layer))} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    (out / "compare.md").write_text(text)
    return text


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("side", choices=["prompt", "kvpress", "compare"])
    ap.add_argument("--out", default="bench-results/kvpress-compare")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    {"prompt": prompt_side, "kvpress": kvpress_side, "compare": compare_side}[a.side](out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
