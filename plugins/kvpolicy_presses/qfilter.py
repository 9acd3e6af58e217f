"""Q-Filters (Godey et al., arXiv 2503.02812; kvpress ``QFilterPress``): score keys by their projection on
the principal direction of the queries.

Queries and keys of a head are anisotropic: one direction ``u_h`` carries most of the queries' energy, and
queries project on it with a consistent sign. Then ``E_q[q . k] ~ E_q[q . u_h] (k . u_h)``: the projection
of a key on ``u_h`` estimates the attention a typical query will give it, **without any query at hand**
(compatible with fused attention). Per KV head, the filter is computed once per model on a calibration
corpus:

    Q_kappa = the post-RoPE queries of the query heads of group kappa, stacked     [N, D]
    u_kappa = first right singular vector of Q_kappa (top eigenvector of Q^T Q), signed so that sum_i q_i . u > 0
    score_j = k_j . u_kappa                                                         (cached, post-RoPE keys)

kvpress scores ``-(f . k)`` with filters downloaded from the Hub; with ``f = -u`` that is this score.

Decisions:

* **Calibration** (:func:`calibrate_qfilters`): one prefill per calibration text through a kvpolicy cache whose
  probe scorer accumulates ``Q^T Q`` and ``sum q`` per layer and KV head (fp64); ``u`` is the top eigenvector
  (uncentred: the SVD of the raw queries, as the paper). Queries are **post-RoPE** (what attention uses and
  what the cache's keys are); the group's query heads are stacked (kvpress's filters are per KV head).
  :func:`save_qfilters` / :func:`load_qfilters` write / read a ``.pt`` or ``.json`` file; the packaged
  ``filters: smollm2`` was calibrated on *Emma* (8 x 512 tokens, see ``docs/methods/presses.md``).
* ``filters: null`` estimates ``u`` from the **current event's own queries** (per row, valid queries only):
  no calibration, but not query-agnostic any more (a variant, not the paper's).
* ``fallback``: a file whose shapes do not fit the layer raises a ``ConfigError`` (``error``, default) or uses
  the prompt's queries for that layer (``prompt``, figure ``qfilter_prompt_layers``): the ``qfilter-smollm2``
  preset takes ``prompt`` so that it also runs on other models, visibly.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, PrivateAttr
from torch import Tensor

from kvpolicy.errors import ConfigError
from kvpolicy.policy import Budget, CompressionContext, Policy, Scorer

FORMAT = "kvpolicy-qfilters/1"
PACKAGED = {"smollm2": Path(__file__).with_name("qfilters_smollm2.json")}


def principal_direction(gram: Tensor, qsum: Tensor) -> Tensor:
    """``[..., D]`` unit top eigenvector of ``gram [..., D, D]``, signed so that ``qsum . u >= 0``."""
    _, vecs = torch.linalg.eigh(gram.double())
    u = vecs[..., -1]
    sign = torch.where((qsum.double() * u).sum(-1, keepdim=True) < 0, -1.0, 1.0)
    return (u * sign).float()


def group_stats(queries: Tensor, valid: Tensor, kv_heads: int) -> tuple[Tensor, Tensor]:
    """``(Q^T Q [B, Hkv, D, D], sum q [B, Hkv, D])`` fp64 over the valid queries ``[B, H, Q, D]`` of each group."""
    b, h, q, d = queries.shape
    x = queries.double().view(b, kv_heads, h // kv_heads, q, d) * valid[:, None, None, :, None]
    x = x.reshape(b, kv_heads, -1, d)  # [B, Hkv, g * Q, D]
    return x.transpose(-1, -2) @ x, x.sum(2)


def save_qfilters(filters: Tensor, path: str | os.PathLike[str], meta: dict[str, Any] | None = None) -> Path:
    """Write ``filters [layers, Hkv, D]`` to ``path`` (``.json``: rounded to 7 digits; else ``torch.save``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"format": FORMAT, **(meta or {})}
    if path.suffix == ".json":
        data["filters"] = [[[round(float(x), 7) for x in head] for head in layer] for layer in filters.tolist()]
        path.write_text(json.dumps(data))
    else:
        torch.save({**data, "filters": filters.float().cpu()}, path)
    return path


@functools.lru_cache(maxsize=4)
def _load(path: str, mtime: float) -> Tensor:
    p = Path(path)
    data = json.loads(p.read_text()) if p.suffix == ".json" else torch.load(p, map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ConfigError(f"qfilter filters={path!r} is not a file written by kvpolicy_presses.qfilter.save_qfilters "
                          f"(format {FORMAT!r})")
    f = torch.as_tensor(data["filters"], dtype=torch.float32)
    if f.dim() != 3:
        raise ConfigError(f"qfilter filters={path!r}: expected [layers, kv_heads, head_dim], got {tuple(f.shape)}")
    return f


def load_qfilters(name_or_path: str) -> Tensor:
    """``[layers, Hkv, D]`` filters from a packaged name (``smollm2``) or a file path."""
    p = PACKAGED.get(name_or_path, Path(name_or_path).expanduser())
    if not p.is_file():
        raise ConfigError(f"qfilter filters={name_or_path!r}: no such file; allowed: {', '.join(PACKAGED)} or a path "
                          f"written by `python -m kvpolicy_presses.calibrate qfilter --out PATH`")
    return _load(str(p), p.stat().st_mtime)


class QFilter(Scorer):
    """Q-Filters: projection of each key on its head's principal query direction (calibrated per model)."""

    name: ClassVar[str] = "qfilter"
    paper: ClassVar[str] = "Q-Filters, Godey et al. 2025, arXiv:2503.02812"
    filters: str | None = Field(default=None, description="packaged name (smollm2) or file of calibrated filters; "
                                                          "None: the direction of this event's own queries")
    fallback: Literal["error", "prompt"] = Field(default="error",
                                                 description="a file that does not fit the layer: error, or use the "
                                                             "prompt's queries for that layer")

    def score(self, ctx: CompressionContext) -> Tensor:
        b, h, s = ctx.shape
        d = ctx.keys.shape[-1]
        f = None
        if self.filters is not None:
            table = load_qfilters(self.filters)
            if ctx.layer_idx < table.shape[0] and table.shape[1:] == (h, d):
                f = table[ctx.layer_idx].to(ctx.keys.device).expand(b, h, d)
            elif self.fallback == "error":
                raise ConfigError(f"qfilter filters={self.filters!r} hold {tuple(table.shape)} = [layers, kv_heads, "
                                  f"head_dim]; layer {ctx.layer_idx} has {h} KV heads x {d} dims: calibrate this model "
                                  f"(`python -m kvpolicy_presses.calibrate qfilter`) or set fallback: prompt")
            else:
                ctx.figures["qfilter_prompt_layers"] = 1
        if f is None:
            q = ctx._need_queries("qfilter without calibrated filters")
            qv = ctx.query_valid
            if qv is None:
                qv = torch.ones(q.shape[0], q.shape[2], dtype=torch.bool, device=q.device)
            with torch.no_grad():
                gram, qsum = group_stats(q, qv, h)
                f = principal_direction(gram, qsum).to(ctx.keys.device)  # [B, Hkv, D]
        scores = (ctx.keys.float() * f[:, :, None, :]).sum(-1)
        return torch.where(ctx.valid, scores, float("-inf"))


class _QueryProbe(Scorer):
    """Calibration only (not registered): accumulates the groups' query statistics, scores by recency."""

    name: ClassVar[str] = "qfilter-probe"
    paper: ClassVar[str] = "Q-Filters, Godey et al. 2025, arXiv:2503.02812"
    _acc: dict[int, list[Any]] = PrivateAttr(default_factory=dict)  # layer -> [Q^T Q [Hkv, D, D], sum q [Hkv, D]]

    def score(self, ctx: CompressionContext) -> Tensor:
        qv = ctx.query_valid if ctx.query_valid is not None else torch.ones(ctx.queries.shape[0], ctx.queries.shape[2],
                                                                             dtype=torch.bool)
        gram, qsum = group_stats(ctx.queries, qv, ctx.shape[1])
        acc = self._acc.setdefault(ctx.layer_idx, [0, 0])
        acc[0] = acc[0] + gram.sum(0)
        acc[1] = acc[1] + qsum.sum(0)
        return ctx.positions[:, :1].float()



def calibrate_qfilters(model: Any, prompts: list[Tensor]) -> Tensor:
    """``[layers, Hkv, D]`` Q-filters of ``model`` from calibration prompts (each ``input_ids [1, L]``).

    One prefill per prompt through a kvpolicy cache whose probe scorer accumulates ``Q^T Q`` and ``sum q``
    of each group's post-RoPE queries; the filter is the signed top eigenvector.
    """
    import kvpolicy
    from kvpolicy.registry import get_registry

    reg = get_registry()
    comp = lambda kind, name: reg.component(kind, name)()  # noqa: E731
    probe = _QueryProbe()
    for ids in prompts:
        policy = Policy(name="qfilter-calibration", budget=Budget(tokens=max(1, int(ids.shape[1]) - 1), sink=0),
                        scorer=probe, selector=comp("selector", "topk"), merger=comp("merger", "none"),
                        decode=comp("decode", "none"), schedule=comp("schedule", "uniform"))
        with torch.inference_mode(), kvpolicy.compress(model, policy) as cache:
            model(input_ids=ids, cache=cache)
    if not probe._acc:
        raise ConfigError("qfilter calibration saw no layer: give prompts of at least 2 tokens")
    return torch.stack([principal_direction(*probe._acc[i]) for i in sorted(probe._acc)])
