"""CriticalKV (Feng et al., arXiv 2502.03805, "Identify Critical KV Cache in LLM Inference from an Output
Perturbation Perspective"; kvpress ``CriticalKVPress``).

An entry matters by how much dropping it perturbs the attention *output*, and the output of head ``h`` is
``W_o^h sum_j A_hj v_j``: the attention weight alone ignores how large the entry's value is once projected.
CriticalKV refines a base score (SnapKV by default) in two stages:

    stage 1:  the n1 = floor(first_stage_ratio * B) entries of highest base score s_j are kept first
    stage 2:  every score becomes  (s_j + eps) * mean_{h in group(kappa)} ||W_o^h v_j||_1

and the budget keeps the stage-1 entries, then the best stage-2 scores. ``W_o^h`` is head ``h``'s
``[hidden, D]`` block of the layer's output projection (``o_proj.weight[:, h*D:(h+1)*D]``).

Decisions:

* **Where W_o comes from.** A compression context carries no model weights. :func:`save_out_proj` writes
  the model's ``o_proj`` weights to a file (one tensor per layer) and ``out_proj: PATH`` reads it: that is
  CriticalKV exactly (tested against a reference on SmolLM2). ``out_proj: null`` (the ``criticalkv-vnorm``
  preset, for any model) takes ``W_o = I``: stage 2 multiplies by ``||v_j||_1``; this is **not** CriticalKV's
  projected norm, it is its closest weight-free variant (ignores how ``W_o`` stretches directions).
  A file whose shapes do not match the layer is refused (``ConfigError`` naming both).
* **Stage-1 entries** score ``float32 max`` (kvpress: ``finfo.max``), above every stage-2 score; ``n1`` is
  per row, from the layer budget (kvpress: ``int((1 - compression_ratio) * k_len * first_stage_ratio)``),
  ranked on valid entries only, ties to the lower position.
* **Base scorer**: any registered scorer (``base: {name: ..., params...}``), checked when the config loads;
  layer-shared base scores (``[B, 1, S]``) are broadcast to the KV heads. The base's observations are
  computed lazily by the context (not fused into the prefill attention).
* L1 norm, group mean over the query heads of each KV head, fp32, one head at a time (``S x hidden``).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import Field, field_validator
from torch import Tensor

from kvpolicy.errors import ConfigError
from kvpolicy.policy import CompressionContext, Scorer

FORMAT = "kvpolicy-out-proj/1"
BIG = torch.finfo(torch.float32).max


def save_out_proj(model: Any, path: str | os.PathLike[str]) -> Path:
    """Write the output-projection weights of ``model``'s attention layers to ``path`` (a ``.pt`` file).

    Every module with an ``o_proj`` and a ``layer_idx`` (Llama, Mistral, Qwen, Gemma naming) is taken, in
    layer order; the file holds ``{"format", "num_attention_heads", "head_dim", "o_proj": [W_l [hidden, H*D]]}``.
    """
    mods = sorted(((m.layer_idx, m) for m in model.modules() if hasattr(m, "o_proj") and hasattr(m, "layer_idx")),
                  key=lambda t: t[0])
    if not mods:
        raise ConfigError(f"{type(model).__name__} has no attention module with an `o_proj` and a `layer_idx`; "
                          f"allowed: Llama-style models (Llama, Mistral, Qwen, Gemma)")
    cfg = getattr(model.config, "text_config", None) or model.config
    heads = int(cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    out = {"format": FORMAT, "num_attention_heads": heads, "head_dim": head_dim,
           "o_proj": [m.o_proj.weight.detach().float().cpu().clone() for _, m in mods]}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, path)
    return path


@functools.lru_cache(maxsize=4)
def _load(path: str, mtime: float) -> dict[str, Any]:
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ConfigError(f"criticalkv out_proj={path!r} is not a file written by "
                          f"kvpolicy_presses.criticalkv.save_out_proj (format {FORMAT!r})")
    return data


def load_out_proj(path: str) -> dict[str, Any]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"criticalkv out_proj={path!r}: no such file; write one with "
                          f"`python -m kvpolicy_presses.calibrate out-proj --out {path}`")
    return _load(str(p), p.stat().st_mtime)


def projected_norm(ctx: CompressionContext, out_proj: str | None) -> Tensor:
    """``[B, Hkv, S]`` fp32: ``mean_{h in group} ||W_o^h v_j||_1`` (``||v_j||_1`` when ``out_proj`` is None)."""
    values = ctx.values.float()  # [B, Hkv, S, D]
    if out_proj is None:
        return values.abs().sum(-1)
    data = load_out_proj(out_proj)
    b, hkv, s, d = values.shape
    layers, heads, head_dim = data["o_proj"], int(data["num_attention_heads"]), int(data["head_dim"])
    if ctx.layer_idx >= len(layers) or head_dim != d or heads % hkv:
        raise ConfigError(
            f"criticalkv out_proj={out_proj!r} holds {len(layers)} layers of {heads} heads x {head_dim} dims; "
            f"layer {ctx.layer_idx} has {hkv} KV heads x {d} dims: the file is for another model")
    w = layers[ctx.layer_idx].to(values.device)  # [hidden, H * D]
    g = heads // hkv
    out = torch.zeros(b, hkv, s, dtype=torch.float32, device=values.device)
    for h in range(heads):
        w_h = w[:, h * d:(h + 1) * d]  # [hidden, D]
        out[:, h // g] += (values[:, h // g] @ w_h.T).abs().sum(-1)  # [B, S]
    return out / g


class CriticalKV(Scorer):
    """CriticalKV: base score, top first_stage_ratio of the budget kept first, the rest by score * ||W_o v||_1."""

    name: ClassVar[str] = "criticalkv"
    paper: ClassVar[str] = "CriticalKV, Feng et al. 2025, arXiv:2502.03805"
    observations: ClassVar[frozenset[str]] = frozenset({"window_attention"})
    base: dict[str, Any] = Field(default_factory=lambda: {"name": "snapkv"},
                                 description="the base scorer: {name: ..., parameters...} (default SnapKV)")
    first_stage_ratio: float = Field(default=0.5, ge=0.0, le=1.0,
                                     description="share of the budget kept by the base score")
    epsilon: float = Field(default=1e-4, ge=0.0, description="added to the base score before the projected norm")
    out_proj: str | None = Field(default=None, description="file from save_out_proj (exact CriticalKV); "
                                                           "None: W_o = I, the value's L1 norm (a variant)")

    @field_validator("base")
    @classmethod
    def _check_base(cls, v: dict[str, Any]) -> dict[str, Any]:
        _build_base(v)
        return v

    def score(self, ctx: CompressionContext) -> Tensor:
        base = _build_base(self.base).score(ctx).float()
        b, h, s = ctx.shape
        base = base.expand(b, h, s)
        valid = ctx.valid
        total = ctx.budget.total.to(base.device)
        n1 = (total.double() * self.first_stage_ratio).floor().long()  # [B]
        ranked = torch.where(valid, base, float("-inf"))
        order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(s, device=base.device).expand(b, h, s))
        stage1 = valid & (rank < n1[:, None, None])
        out = (base + self.epsilon) * projected_norm(ctx, self.out_proj)
        out = torch.where(stage1, BIG, out)
        return torch.where(valid, out.nan_to_num(nan=0.0, posinf=BIG, neginf=-BIG), float("-inf"))


def _build_base(spec: dict[str, Any]) -> Scorer:
    from kvpolicy.registry import get_registry

    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise ValueError(f"base={spec!r}: give the base scorer as a mapping {{'name': ..., parameters...}}")
    if spec["name"] == "criticalkv":
        raise ValueError("base: criticalkv cannot wrap itself; allowed: any other registered scorer")
    cls = get_registry().component("scorer", spec["name"])
    return cls(**{k: v for k, v in spec.items() if k != "name"})
