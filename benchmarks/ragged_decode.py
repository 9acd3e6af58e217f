"""Decode time per token of ragged layers (heads stored apart) against the dense masked layout, on SmolLM2.

    python benchmarks/ragged_decode.py --tokens 2000 --new 32 --repeats 3

The same ``adakv-snapkv`` selection decoded from ragged layers (``cache.ragged = True``, the default) and
from the dense layout padded to each layer's longest head (``cache.ragged = False``), beside uniform
``snapkv`` at the same budget; the three alternate within each repeat; one torch thread. Prints the median
ms per generated token and the KV bytes each holds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import kvpolicy
from kvpolicy.bench.tasks import make_sample


def decode_ms(model, ids, preset, budget, ragged, new):  # noqa: ANN001, ANN201
    with torch.inference_mode(), kvpolicy.compress(model, preset, budget=budget) as cache:
        cache.ragged = ragged
        out = model(input_ids=ids, cache=cache, logits_to_keep=1)
        nxt = out.logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for _ in range(new):
            nxt = model(input_ids=nxt, cache=cache).logits[:, -1:].argmax(-1)
        ms = (time.perf_counter() - t0) / new * 1e3
        return ms, cache.report().bytes_now / cache.report().bytes_full


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--budget", type=float, default=0.2)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(1)
    model, tok = kvpolicy.models.load_default()
    ids = torch.tensor([make_sample(tok, a.tokens, seed=0, depths=(0.5,), continuation=32, span=48, cue=8,
                                    gen_tokens=16)["context"]])
    runs = {"adakv-snapkv ragged": ("adakv-snapkv", True), "adakv-snapkv dense": ("adakv-snapkv", False),
            "snapkv": ("snapkv", True)}
    res: dict[str, list[tuple[float, float]]] = {k: [] for k in runs}
    for _ in range(a.repeats):
        for name, (preset, ragged) in runs.items():
            res[name].append(decode_ms(model, ids, preset, a.budget, ragged, a.new))
    for name, rs in res.items():
        print(json.dumps({"run": name, "tokens": ids.shape[1], "budget": a.budget,
                          "decode_ms_per_token": round(statistics.median(r[0] for r in rs), 2),
                          "all_ms": [round(r[0], 2) for r in rs], "kv_held": round(rs[-1][1], 4)}))


if __name__ == "__main__":
    main()
