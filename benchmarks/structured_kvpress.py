"""Kept entries of the structured plugin's presets against kvpress's presses on the same model and prompt.

Three steps (the kvpress side runs in kvpress's own virtualenv, see ``benchmarks/kvpress_env.sh``):

    python benchmarks/structured_kvpress.py sample --out /tmp/sk/sample.json
    .venv-kvpress/bin/python benchmarks/structured_kvpress.py kvpress --sample /tmp/sk/sample.json \
        --out /tmp/sk/kvpress.json
    python benchmarks/structured_kvpress.py ours --kvpress /tmp/sk/kvpress.json

The sample is ``kvpolicy bench``'s 2000-token context (seed 0, the results page's sizes). kvpress shrinks
the cache by gathering entries, so the kept indices are recovered by matching each kept key with the full
prefill's keys (exact equality; ``FinchPress`` runs with ``rerotate_keys=False`` for that). KVzip masks
entries instead (``masked_key_indices``): its kept set is the complement. Our side runs each preset with a
token budget equal to what kvpress kept (kvpress computes ``int(n * (1 - compression_ratio))`` in floating
point: 399 of 2000 at ``compression_ratio = 0.8``) and prints, per press, the kept entries that differ.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

MODEL = Path(os.environ.get("KVPOLICY_CACHE", Path.home() / ".cache" / "kvpolicy")) / "smollm2-135m-instruct"
RATIO = 0.8  # kvpress's compression_ratio (kvpolicy budget 0.2)


def cmd_sample(a: argparse.Namespace) -> None:
    from kvpolicy import models
    from kvpolicy.bench.tasks import make_sample

    _, tok = models.load_default()
    s = make_sample(tok, 2000, seed=0, depths=(0.5,), continuation=32, span=48, cue=8, gen_tokens=16)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"context": s["context"]}))


def _match(comp: torch.Tensor, full: torch.Tensor) -> list[list[int]]:
    """Per head, the index in ``full [H, S, D]`` of each row of ``comp [H, K, D]`` (copies, up to the float
    noise of a second prefill: the nearest key, which must be far closer than the second nearest)."""
    out = []
    for h in range(full.shape[0]):
        d = torch.cdist(comp[h].double(), full[h].double())
        v, i = d.topk(2, dim=-1, largest=False)
        assert bool((v[:, 0] < 1e-3 * v[:, 1]).all()), f"a kept key matches no prefill key ({float(v[:, 0].max())})"
        out.append(sorted(i[:, 0].tolist()))
    return out


def cmd_kvpress(a: argparse.Namespace) -> None:
    import kvpress
    from transformers import AutoModelForCausalLM, DynamicCache

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32, local_files_only=True).eval()
    ids = torch.tensor([json.loads(Path(a.sample).read_text())["context"]])
    n = ids.shape[1]

    def prefill(press):  # noqa: ANN001, ANN202
        cache = DynamicCache()
        with torch.inference_mode():
            if press is None:
                model.model(input_ids=ids, past_key_values=cache)
            else:
                with press(model):
                    model.model(input_ids=ids, past_key_values=cache)
        return cache

    full = prefill(None)
    result: dict = {"n": n, "kvpress": getattr(kvpress, "__version__", "?"), "presses": {}}
    finch = kvpress.FinchPress(compression_ratio=RATIO, rerotate_keys=False)
    finch.delimiter_token_id, finch.window_size = -1, 32  # no delimiter: the question is the last 32 tokens
    presses = {
        "chunkkv": kvpress.ChunkKVPress(press=kvpress.SnapKVPress(compression_ratio=RATIO), chunk_length=20),
        "simlayerkv": kvpress.SimLayerKVPress(lazy_threshold=0.9),
        "finch": finch,
    }
    for name, press in presses.items():
        cache = prefill(press)
        result["presses"][name] = [_match(cache.layers[i].keys[0], full.layers[i].keys[0])
                                   for i in range(len(cache.layers))]
    if a.kvzip:
        press = kvpress.KVzipPress(compression_ratio=RATIO, layerwise=True)
        prefill(press)  # KVzip masks: the pruned (batch, head, seq) indices are left on each attention module
        kept = []
        for layer in model.model.layers:
            _, heads, seqs = layer.self_attn.masked_key_indices
            mask = torch.ones(full.layers[0].keys.shape[1], n, dtype=torch.bool)
            mask[heads, seqs] = False
            kept.append([torch.nonzero(mask[h]).flatten().tolist() for h in range(mask.shape[0])])
            del layer.self_attn.masked_key_indices
        result["presses"]["kvzip"] = kept
    Path(a.out).write_text(json.dumps(result))


def cmd_ours(a: argparse.Namespace) -> None:
    import kvpolicy

    torch.set_num_threads(1)
    model, tok = kvpolicy.models.load_default()
    peer = json.loads(Path(a.kvpress).read_text())
    sample = json.loads(Path(a.sample).read_text()) if a.sample else None
    ids = torch.tensor([sample["context"]]) if sample else None
    if ids is None:
        raise SystemExit("--sample is required")
    n = ids.shape[1]
    budgets = {"chunkkv": {"sink": 0}, "simlayerkv": {"sink": 0}, "finch": {"sink": 0}, "kvzip": {"sink": 4}}
    runs = [(name, name, {}) for name in peer["presses"]]
    if "simlayerkv" in peer["presses"]:  # also with kvpress's own window rule
        sel = {**kvpolicy.load_policy("simlayerkv").to_config()["selector"], "window_rule": "kvpress"}
        runs.append(("simlayerkv (window_rule kvpress)", "simlayerkv", {"selector": sel}))
    for label, name, overrides in runs:
        theirs = peer["presses"][name]
        counts = {len(h) for layer in theirs for h in layer}
        tokens = min(counts) if name != "simlayerkv" else n - 1
        if name == "kvzip":  # kvpress's layer-wise KVzip: one count per layer over its heads; ours per head
            tokens = n - int(n * len(theirs[0]) * RATIO) // len(theirs[0])
        policy = kvpolicy.load_policy(name, budget={"tokens": tokens, **budgets[name]}, **overrides)
        kw = {"tokenizer": tok} if name == "kvzip" else {}
        with torch.inference_mode(), kvpolicy.compress(model, policy, **kw) as cache:
            model(input_ids=ids, cache=cache, logits_to_keep=1)
        diff = total = decisions = 0
        for li, layer in enumerate(cache.layers):
            for h in range(layer.positions.shape[1]):
                ours = set(layer.positions[0, h][layer.valid[0, h]].tolist())
                ref = set(theirs[li][h])
                diff += len(ref - ours)
                total += len(ref)
            if name == "simlayerkv":
                decisions += (len(theirs[li][0]) < n) != (int(layer.valid[0, 0].sum()) < n)
        line = f"{label}: {diff} of {total} kvpress-kept entries not kept by us ({100 * diff / max(1, total):.2f} %)"
        if name == "simlayerkv":
            line += f"; lazy decisions differing: {decisions} of {len(cache.layers)} layers"
        print(line + f" [our budget {tokens} tokens; kvpress counts {sorted(counts)[:3]}]")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sample")
    s.add_argument("--out", required=True)
    k = sub.add_parser("kvpress")
    k.add_argument("--sample", required=True)
    k.add_argument("--out", required=True)
    k.add_argument("--kvzip", action="store_true", help="also KVzipPress (re-reads the context: slow)")
    o = sub.add_parser("ours")
    o.add_argument("--kvpress", required=True)
    o.add_argument("--sample", required=True)
    a = ap.parse_args()
    {"sample": cmd_sample, "kvpress": cmd_kvpress, "ours": cmd_ours}[a.cmd](a)


if __name__ == "__main__":
    main()
