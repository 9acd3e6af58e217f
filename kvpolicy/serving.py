"""Engine-free support for serving engines: compress one request's prompt, every layer and head to one count.

A serving engine (vLLM, see ``plugins/kvpolicy_vllm``) keeps each request's KV cache in fixed-size blocks
and gives blocks back only whole, so a compressed request must hold the same number of entries in every
layer and every KV head. When a request's prompt has been prefilled, the engine reads, per layer, the
request's keys and values ``[Hkv, L, D]`` out of its blocks, and the last queries of the prompt; this
module runs the policy on them and returns the ``K`` entries to write back into the request's first blocks.

What a serving engine cannot give is refused here, before a request runs (:func:`check_servable`): layer
schedules that give layers different counts, decode-time rules, a logit bias on merged entries, and
observations that need every prompt query (accumulated or max attention, context reconstruction).

Nothing here imports an engine or ``transformers``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from torch import Tensor

from kvpolicy import tracing
from kvpolicy.config import format_validation, load_policy
from kvpolicy.errors import ConfigError, StepOutputError
from kvpolicy.policy import CompressionContext, DecodeRule, LayerBudget, Policy

#: the key under which engines carry kvpolicy's settings (vLLM: ``additional_config`` and ``extra_args``)
CONFIG_KEY = "kvpolicy"

#: observations a serving engine gives a policy step
SERVABLE_OBSERVATIONS = frozenset({"window_attention", "key_norms"})
_WHY_NOT = {
    "accumulated_attention": "the accumulated attention of every prompt query (under chunked prefill the "
                             "engine sees one chunk of queries at a time)",
    "max_attention": "the max attention over every prompt query (under chunked prefill the engine sees one "
                     "chunk of queries at a time)",
    "queries": "every prompt query (under chunked prefill the engine sees one chunk of queries at a time)",
    "reconstruction_attention": "a context-reconstruction pass (the engine runs each prompt once)",
}
RUNS_INSTEAD = "snapkv, tova, knorm, streaming, random (or any policy whose steps use keys, values, key norms " \
               "and the attention of the last prompt queries)"


class ServeConfig(BaseModel):
    """kvpolicy's settings in a serving engine (``{"kvpolicy": {...}}``).

    ``policy``: a preset name, a path to a YAML/JSON/TOML policy file, or a policy mapping;
    ``budget``: overrides the policy's budget (a ratio ``0.2``, a token count ``512`` or a mapping);
    ``enabled``: False serves without compression (a request can switch its engine's policy off);
    ``admission``: ``"reserve"`` (default) admits a compressed request only while every running compressed
    request and the new one still fit at their largest once compressed (kept entries + every output token), and
    the blocks the running ones take while its prompt is prefilled stay free, so admitted requests are not
    preempted by its prefill or by their own growth;
    ``"eager"`` leaves admission to the engine (more requests at once, but a full pool preempts one, which is
    prefilled and compressed again from scratch).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    policy: str | dict[str, Any] = Field(default="snapkv", description="preset name, policy file or mapping")
    budget: float | int | dict[str, Any] | None = Field(default=None, description="budget override")
    enabled: bool = True
    admission: Literal["reserve", "eager"] = Field(
        default="reserve", description="reserve blocks for the growth of running compressed requests, or not")

    @field_validator("budget")
    @classmethod
    def _budget_range(cls, v: Any) -> Any:
        if isinstance(v, float) and not 0.0 < v <= 1.0:
            raise ValueError("a ratio must be in (0, 1]")
        if isinstance(v, int) and not isinstance(v, bool) and v < 1:
            raise ValueError("a token count must be >= 1")
        return v

    def key(self) -> str:
        """A stable string naming these settings (equal settings, equal key)."""
        return json.dumps(self.model_dump(mode="json"), sort_keys=True)

    def build(self) -> Policy:
        return load_policy(self.policy, **({} if self.budget is None else {"budget": self.budget}))


def parse_serve_config(data: Any, where: str) -> ServeConfig:
    """``data`` as a :class:`ServeConfig`: a mapping, a JSON string, a preset name, or ``False``/``"off"``.

    Raises:
        ConfigError: naming ``where`` the settings came from, the bad field and what is allowed.
    """
    if isinstance(data, ServeConfig):
        return data
    if data is False or (isinstance(data, str) and data.strip().lower() in ("off", "none", "false")):
        return ServeConfig(enabled=False)
    if isinstance(data, str):
        text = data.strip()
        if text.startswith("{"):
            try:
                data = json.loads(text)
            except json.JSONDecodeError as err:
                raise ConfigError(f"{where}: not valid JSON ({err.msg} at character {err.pos}): {text[:80]!r}") from None
        else:
            data = {"policy": text}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping such as {{'policy': 'snapkv', 'budget': 0.2}}, a preset "
                          f"name or 'off'; got {type(data).__name__} {data!r}")
    try:
        return ServeConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation(err, prefix=f"{where}: ", allowed=tuple(ServeConfig.model_fields))) from None


@dataclass(frozen=True)
class ServablePolicy:
    """A policy a serving engine can run, with what it needs from the engine."""

    config: ServeConfig
    policy: Policy
    n_layers: int
    #: how many of the prompt's last queries the steps look at (0: none); the engine keeps these across chunks
    query_window: int
    _kept: dict[int, int] = field(default_factory=dict, repr=False, compare=False)  # tokens -> kept, memoised

    def kept(self, n_tokens: int) -> int:
        """Entries every layer and head of a request keeps after a prompt of ``n_tokens`` tokens."""
        hit = self._kept.get(n_tokens)
        if hit is not None:
            return hit
        budgets = self.policy.layer_budgets(self.n_layers, torch.tensor([n_tokens]))
        counts = {int(b.total[0]) for b in budgets}
        if len(counts) != 1:  # check_servable refuses such policies; a guard against a schedule that changed
            raise ConfigError(f"policy {self.policy.name!r} gives layers different counts {sorted(counts)} at "
                              f"{n_tokens} tokens; a serving engine needs one count for every layer")
        if len(self._kept) > 4096:
            self._kept.clear()
        self._kept[n_tokens] = counts.pop()
        return self._kept[n_tokens]

    def compress(self, layer_idx: int, keys: Tensor, values: Tensor, queries: Tensor | None,
                 query_pos: Tensor | None, scaling: float) -> tuple[Tensor, Tensor]:
        """Compress one layer of one request.

        Args:
            keys: ``[Hkv, L, D]``, the request's keys in position order (post-RoPE).
            values: ``[Hkv, L, D]``, its values.
            queries: ``[H, Q, D]`` post-RoPE, the prompt's last ``Q >= min(query_window, L)`` queries.
            query_pos: ``[Q]`` long, their positions (the last is ``L - 1``).
        Returns:
            The kept keys and values, ``[Hkv, K, D]`` each with ``K = kept(L)``, in the input dtypes.
        """
        n = keys.shape[1]
        k = self.kept(n)
        budget = self.policy.layer_budgets(self.n_layers, torch.tensor([n]))[layer_idx]
        ctx = _layer_context(ServingContext, layer_idx, self.n_layers, keys[None], values[None], budget, scaling,
                             None if queries is None else queries[None],
                             None if query_pos is None else query_pos[None])
        p = self.policy
        ev = tracing.CompressionEvent(layer=layer_idx, phase="prefill", policy=p.name, scorer=p.scorer.name,
                                      merger=p.merger.name, tokens_in=n, bytes_before=2 * keys.numel() * keys.element_size())
        with tracing.compress_span(ev):  # the same span and metrics as the transformers cache's
            selection, merged = p.compress(ctx)
            ev.tokens_kept, ev.tokens_merged = k, int(merged.merged)
            ev.tokens_dropped = n - k - ev.tokens_merged
            ev.bytes_after = ev.bytes_before * k // n
            ev.figures = dict(ctx.figures)
        if _has_bias(merged):
            raise StepOutputError(_bias_refusal(self.policy), prop="no_bias")
        if merged.key_channels is not None:
            raise StepOutputError(_channels_refusal(self.policy), prop="no_key_channels")
        if merged.keys.shape[-2] != k or not bool(selection.kept.all()):
            raise StepOutputError(
                f"policy {self.policy.name!r} kept {int(selection.kept.sum())} entries in {merged.keys.shape[-2]} slots "
                f"at layer {layer_idx}; a serving engine needs exactly {k} per head (the layer budget)",
                prop="exact_size")
        return merged.keys[0].to(keys.dtype), merged.values[0].to(values.dtype)


def _layer_context(cls: type[CompressionContext], layer_idx: int, n_layers: int, keys: Tensor, values: Tensor,
                   budget: LayerBudget, scaling: float, queries: Tensor | None, query_pos: Tensor | None
                   ) -> CompressionContext:
    """The context of one request's prefill: ``keys``/``values`` ``[1, Hkv, S, D]``, entries at positions
    ``0 .. S-1``, all valid and text; ``queries [1, H, Q, D]`` at ``query_pos [1, Q]``."""
    _, hkv, n, _ = keys.shape
    dev = keys.device
    if budget.total.device != dev:
        budget = LayerBudget(total=budget.total.to(dev), sink=budget.sink, recent=budget.recent.to(dev),
                             ratio=budget.ratio, seen=None if budget.seen is None else budget.seen.to(dev))
    return cls(layer_idx=layer_idx, n_layers=n_layers, phase="prefill", keys=keys, values=values,
               positions=torch.arange(n, device=dev).expand(1, hkv, n),
               valid=torch.ones(1, hkv, n, dtype=torch.bool, device=dev),
               is_image=torch.zeros(1, hkv, n, dtype=torch.bool, device=dev), budget=budget, scaling=scaling,
               queries=queries, query_pos=query_pos)


def _has_bias(merged: Any) -> bool:
    return merged.bias is not None and not bool((merged.bias == 0).all())


def _bias_refusal(policy: Policy) -> str:
    return (f"policy {policy.name!r}: merger {policy.merger.name!r} returns a logit bias for merged entries (the log "
            f"of the tokens each stands for); a serving engine's attention takes no bias: use a merger without it "
            f"(runs: {RUNS_INSTEAD})")


def _channels_refusal(policy: Policy) -> str:
    return (f"policy {policy.name!r}: merger {policy.merger.name!r} drops key channels (ThinK); a serving engine's "
            f"KV blocks hold every channel of every key: use a merger that keeps them (runs: {RUNS_INSTEAD})")


class ServingContext(CompressionContext):
    """The context of a serving engine: the statistics it cannot give are refused, not approximated."""

    def accumulated_attention(self, query_stride: int = 1) -> Tensor:
        raise ConfigError(_refusal("accumulated_attention"))

    def max_attention(self) -> Tensor:
        raise ConfigError(_refusal("max_attention"))

    def reconstruction_attention(self) -> Tensor:
        raise ConfigError(_refusal("reconstruction_attention"))

    def window_attention(self, window: int) -> Tensor:
        got = 0 if self.queries is None else self.queries.shape[2]
        need = min(window, self.keys.shape[2])
        if got < need:
            raise ConfigError(f"window attention over the last {window} queries needs {need} queries; the serving "
                              f"engine kept {got} (its query window is set from the policy at start)")
        return super().window_attention(window)


class _Probe(ServingContext):
    """Dry-run context: records the query windows the steps ask for."""

    windows: list[int]

    def window_attention(self, window: int) -> Tensor:
        self.windows.append(window)
        return super().window_attention(window)


def _refusal(what: str, step: str = "") -> str:
    who = f"step {step!r} " if step else ""
    return (f"{who}needs {_WHY_NOT.get(what, repr(what))}, which a serving engine cannot give; policies that run: "
            f"{RUNS_INSTEAD}")


def check_servable(config: ServeConfig, n_layers: int, where: str = "kvpolicy") -> ServablePolicy:
    """Build the policy of ``config`` and check that a serving engine can run it as it is.

    Refused (:class:`ConfigError` naming the part, why, and what runs instead): decode rules that act
    while tokens are generated; layer schedules or per-layer budgets that give layers different counts; steps
    that observe more than keys, values, key norms and the attention of the last prompt queries; mergers
    that return a logit bias. A dry run on a small synthetic layer finds the query window the steps use.
    """
    try:
        policy = config.build()
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    name = policy.name
    rule = policy.decode
    if type(rule).on_decode is not DecodeRule.on_decode or rule.compacts:
        raise ConfigError(f"{where}: policy {name!r} uses decode rule {rule.name!r}, which changes the cache while "
                          f"tokens are generated; a serving engine compresses once, after the prompt: use decode "
                          f"'none' (runs: {RUNS_INSTEAD})")
    for step in policy.steps():
        bad = sorted(step.observations - SERVABLE_OBSERVATIONS)
        if bad:
            raise ConfigError(f"{where}: policy {name!r}: " + _refusal(bad[0], step=step.name))
    if policy.reconstruction() is not None:
        raise ConfigError(f"{where}: policy {name!r}: " + _refusal("reconstruction_attention"))
    if policy.selector.spans_layers():
        raise ConfigError(f"{where}: policy {name!r}: selector {policy.selector.name!r} pools every layer after the "
                          f"prompt; {_SAME_COUNT}")
    for n in (64, 1000, 4096, 32768):
        counts = sorted({int(b.total[0]) for b in policy.layer_budgets(n_layers, torch.tensor([n]))})
        if len(counts) > 1:
            raise ConfigError(
                f"{where}: policy {name!r} gives its {n_layers} layers different budgets ({counts[0]} to "
                f"{counts[-1]} entries at {n} tokens, layer schedule {policy.schedule.name!r} or per-layer "
                f"budgets); a serving engine frees whole blocks, so every layer keeps one count: use layers "
                f"'uniform' and no per-layer budget")
    window = _probe_window(policy, n_layers, where)
    return ServablePolicy(config=config, policy=policy, n_layers=n_layers, query_window=window)


_SAME_COUNT = ("a serving engine frees whole blocks, so every head and layer of a request keeps one count: use "
               "selector 'topk' (adaptive budgets run in the transformers cache)")


def _probe_window(policy: Policy, n_layers: int, where: str) -> int:
    """Run every layer's steps once on a synthetic layer; the largest query window they asked for."""
    hkv, group, d = 2, 2, 8
    tokens = policy.budget.tokens or 0
    n = max(512, 2 * tokens + 64)  # long enough that a budget reaches past a 32-query window
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(1, hkv, n, d, generator=gen)
    values = torch.randn(1, hkv, n, d, generator=gen)
    queries = torch.randn(1, hkv * group, n, d, generator=gen)
    budgets = policy.layer_budgets(n_layers, torch.tensor([n]))
    windows: list[int] = []
    for i in range(n_layers):
        ctx = _layer_context(_Probe, i, n_layers, keys, values, budgets[i], d ** -0.5, queries, torch.arange(n)[None])
        ctx.windows = windows
        try:
            sel, merged = policy.compress(ctx)
        except ConfigError as err:
            raise ConfigError(f"{where}: policy {policy.name!r}: {err}") from None
        per_head = sel.kept.sum(-1)
        if bool((per_head != per_head[:, :1]).any()):
            raise ConfigError(f"{where}: policy {policy.name!r}: selector {policy.selector.name!r} keeps different "
                              f"counts per KV head ({per_head[0].tolist()} at layer {i}); {_SAME_COUNT}")
        if _has_bias(merged):
            raise ConfigError(f"{where}: {_bias_refusal(policy)}")
        if merged.key_channels is not None:
            raise ConfigError(f"{where}: {_channels_refusal(policy)}")
    return max(windows, default=0)


__all__ = ["CONFIG_KEY", "ServeConfig", "ServablePolicy", "ServingContext", "parse_serve_config", "check_servable",
           "RUNS_INSTEAD", "SERVABLE_OBSERVATIONS"]
