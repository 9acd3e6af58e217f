"""Per-model artefacts for the presses that need them, on a local model (offline).

``python -m kvpolicy_presses.calibrate qfilter --out qfilters.json [--model DIR] [--book Emma] [--chunks 8]
[--tokens 512]``: Q-Filters of the model (default: the embedded SmolLM2), calibrated on ``chunks`` passages
of ``tokens`` tokens of an Austen novel; read by ``{"scorer": {"name": "qfilter", "filters": PATH}}``.

``python -m kvpolicy_presses.calibrate out-proj --out o_proj.pt [--model DIR]``: the model's output
projections, read by ``{"scorer": {"name": "criticalkv", "out_proj": PATH}}`` (exact CriticalKV).
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from kvpolicy_presses.criticalkv import save_out_proj
from kvpolicy_presses.qfilter import calibrate_qfilters, save_qfilters


def _model(path: str | None) -> tuple[Any, Any]:
    from kvpolicy import models

    if path is None:
        return models.load_default()
    return models.load(path)


def calibration_prompts(tokenizer: Any, *, book: str = "Emma", chunks: int = 8, tokens: int = 512,
                        offset_chars: int = 20000) -> list[torch.Tensor]:
    """``chunks`` consecutive passages of ``tokens`` tokens of ``book``, each ``input_ids [1, tokens]``."""
    from kvpolicy.data import austen_text

    text = austen_text(book)[offset_chars:offset_chars + chunks * tokens * 8]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < chunks * tokens:
        raise ValueError(f"{book!r} gives {len(ids)} tokens after offset {offset_chars}; need {chunks * tokens}")
    return [torch.tensor([ids[i * tokens:(i + 1) * tokens]]) for i in range(chunks)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kvpolicy_presses.calibrate", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    qf = sub.add_parser("qfilter", help="Q-Filters from an Austen novel")
    qf.add_argument("--out", required=True)
    qf.add_argument("--model", default=None, help="a local model directory (default: embedded SmolLM2)")
    qf.add_argument("--book", default="Emma")
    qf.add_argument("--chunks", type=int, default=8)
    qf.add_argument("--tokens", type=int, default=512)
    op = sub.add_parser("out-proj", help="the output projections, for exact CriticalKV")
    op.add_argument("--out", required=True)
    op.add_argument("--model", default=None)
    args = parser.parse_args(argv)
    model, tok = _model(args.model)
    if args.what == "qfilter":
        prompts = calibration_prompts(tok, book=args.book, chunks=args.chunks, tokens=args.tokens)
        filters = calibrate_qfilters(model, prompts)
        path = save_qfilters(filters, args.out, {"book": args.book, "chunks": args.chunks, "tokens": args.tokens,
                                                 "model": getattr(model.config, "name_or_path", "")})
        print(f"wrote {tuple(filters.shape)} filters to {path}")
    else:
        print(f"wrote {save_out_proj(model, args.out)}")


if __name__ == "__main__":
    main()
