"""Attaching a :class:`~kvpolicy.cache.KVPolicyCache` to a transformers model.

:func:`compress` registers the ``"kvpolicy"`` attention function with transformers' attention
interface, switches the language model's attention modules to it for the duration of the block, and
adds a forward pre-hook on the model that tells the cache which new tokens are padding and which are
visual. The attention function computes each layer's attention (SDPA) with a mask built from the
cache's per-entry metadata, then lets the cache compress that layer right away: peak memory holds one
full layer plus the compressed ones. When the policy scores by the accumulated attention of every
prefill query, the prefill attention is computed by the cache instead, in fp32 query chunks that yield
the output and the statistic from one softmax (no second ``Q·Kᵀ`` pass). On exit the model is restored
exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AttentionInterface

from kvpolicy import compat, observe, tracing
from kvpolicy.cache import KVPolicyCache, KVPolicyLayer, _bias_with_validity
from kvpolicy.errors import CacheUsageError, UnsupportedModelError
from kvpolicy.policy import Policy

ATTN_NAME = "kvpolicy"
_BINDINGS: dict[int, KVPolicyCache] = {}
_VISUAL_TOKEN_ATTRS = ("image_token_id", "image_token_index", "video_token_id", "video_token_index")


def sdpa(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, scaling: float, causal: bool) -> Tensor:
    """Attention of ``query [B, H, q, D]`` over ``key/value [B, Hkv, S, D]`` (GQA aware).

    ``mask`` is additive fp32 ``[B, 1 or Hkv, q, S]``; a per-KV-head mask is applied by folding each
    head's query group into the query axis, so no ``repeat_kv`` copy of the cache is made.
    Returns ``[B, H, q, D]``.
    """
    b, h, q, d = query.shape
    hkv = key.shape[1]
    g = h // hkv
    if mask is None or mask.shape[1] == 1:
        m = mask.to(query.dtype) if mask is not None else None
        return F.scaled_dot_product_attention(query, key, value, attn_mask=m, is_causal=causal and m is None,
                                              scale=scaling, enable_gqa=g > 1)
    s = key.shape[2]
    qf = query.reshape(b, hkv, g * q, d)
    mf = mask.to(query.dtype)[:, :, None].expand(b, hkv, g, q, s).reshape(b, hkv, g * q, s)
    out = F.scaled_dot_product_attention(qf, key, value, attn_mask=mf, scale=scaling)
    return out.reshape(b, h, q, d)


def sdpa_with_lse(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, scaling: float, causal: bool
                  ) -> tuple[Tensor, Tensor | None]:
    """:func:`sdpa` and, on CPU, the log-sum-exp of each query's logits ``[B, H, q]`` fp32 that PyTorch's fused
    flash kernel computes anyway (its ``_scaled_dot_product_flash_attention_for_cpu``); None elsewhere. Every
    probability of the attention is then ``exp(scale · q·k + bias - lse)``: an estimate of the accumulated
    attention can read any (query, key) pair without a softmax (:func:`kvpolicy.observe.estimated_colsum`)."""
    if query.device.type != "cpu":
        return sdpa(query, key, value, mask, scaling, causal), None
    g = query.shape[1] // key.shape[1]
    if g > 1:  # the kernel wants as many KV heads as query heads
        key, value = key.repeat_interleave(g, dim=1), value.repeat_interleave(g, dim=1)
    m = None
    if mask is not None:
        m = mask.to(query.dtype)
        if m.shape[1] not in (1, query.shape[1]):
            m = m.repeat_interleave(g, dim=1)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, 0.0, causal and m is None, attn_mask=m, scale=scaling)
    return out, lse.float()


#: queries per chunk of a sliding-window layer's attention (each chunk sees at most ``chunk + window`` keys)
WINDOW_CHUNK = 512


def layer_attention(query: Tensor, layer: KVPolicyLayer, scaling: float,
                    form: observe.AttentionForm | None = None) -> Tensor:
    """Attention ``[B, H, q, D]`` of the ``q`` queries just appended to ``layer`` over its entries, in the
    model's own form (``layer.form``: soft-capping, sinks, sliding window).

    - plain attention: SDPA with the mask built from the entries' metadata (:func:`sdpa`);
    - a sliding-window layer: :func:`window_attention` (query chunks over the keys each chunk can see);
    - soft-capping or sinks, which SDPA cannot compute: fp32 query chunks
      (:func:`kvpolicy.observe.attention_with_colsum` without the statistic);
    - a ragged layer: KV head ``i`` (``layer.heads[i]``, keys ``[B, 1, S_i, D]``) serves query heads
      ``i*g .. (i+1)*g - 1`` (``g = H / Hkv``, the GQA grouping of transformers' ``repeat_kv``), exact: the same
      softmax over each head's own entries as a dense layout padded with masked slots.
    """
    form = layer.form if form is None else form
    if layer.heads is not None:
        g = query.shape[1] // len(layer.heads)
        return torch.cat([layer_attention(query[:, i * g:(i + 1) * g], hd, scaling, form.group(i, g))
                          for i, hd in enumerate(layer.heads)], dim=1)
    if form.window is not None:
        return window_attention(query, layer, scaling, form)
    if layer.thin_keys is not None:
        return thin_attention(query, layer, scaling, form)
    q_len = query.shape[2]
    if form.plain:
        return sdpa(query, layer.keys, layer.values, layer.attention_mask(q_len, None), scaling, causal=q_len > 1)
    b = query.shape[0]
    qpos = torch.arange(layer.n_before, layer.n_seen, device=query.device).expand(b, q_len)
    out, _ = observe.attention_with_colsum(query, layer.keys, layer.values, scaling=scaling, query_pos=qpos,
                                           key_pos=layer.positions, key_bias=_bias_with_validity(layer),
                                           query_valid=layer.valid_tail(q_len), form=form, sums=False)
    return out


def thin_attention(query: Tensor, layer: KVPolicyLayer, scaling: float, form: observe.AttentionForm,
                   chunk: int = 256) -> Tensor:
    """Attention over a layer whose first entries keep their keys in some channels only (ThinK): query head
    ``i`` meets those keys in its KV head's kept channels (``layer.channels``), the later entries in every
    channel; one softmax over both parts (fp32, query chunks of ``chunk``), as the model computes it with the
    pruned channels of those keys set to zero. Returns ``[B, H, q, Dv]``."""
    b, h, q, d = query.shape
    hkv, dv = layer.values.shape[1], layer.values.shape[-1]
    g = h // hkv
    ch = layer.channels  # [B, Hkv, D']
    thin = layer.thin_keys.float()  # [B, Hkv, S_t, D']
    full = layer.keys.float()  # [B, Hkv, S - S_t, D]
    vals = layer.values.float()
    bias = _bias_with_validity(layer)  # [B, Hkv, S] or None
    qpos_all = torch.arange(layer.n_before, layer.n_seen, device=query.device)
    sinks = None if form.sinks is None else form.sinks.detach().float().view(1, hkv, g, 1, 1)
    out = torch.empty(b, hkv, g, q, dv, dtype=torch.float32, device=query.device)
    for lo in range(0, q, chunk):
        hi = min(q, lo + chunk)
        qc = query[:, :, lo:hi].float().mul(scaling).reshape(b, hkv, g * (hi - lo), d)
        q_thin = torch.gather(qc, -1, ch[:, :, None, :].expand(b, hkv, g * (hi - lo), ch.shape[-1]))
        logits = torch.cat([q_thin @ thin.transpose(-1, -2), qc @ full.transpose(-1, -2)], dim=-1)
        logits = logits.view(b, hkv, g, hi - lo, -1)
        if form.softcap is not None:
            logits = torch.tanh(logits / form.softcap) * form.softcap
        if bias is not None:
            logits = logits + bias[:, :, None, None, :]
        hidden = layer.positions[:, :, None, None, :] > qpos_all[lo:hi][None, None, None, :, None]
        logits = logits.masked_fill(hidden, float("-inf"))
        probs = observe.softmax_with_sinks(logits, sinks, out=torch.empty_like(logits)).nan_to_num_(0.0)
        out[:, :, :, lo:hi] = probs.view(b, hkv, g * (hi - lo), -1).matmul(vals).view(b, hkv, g, hi - lo, dv)
    return out.view(b, h, q, dv).to(query.dtype)


def window_attention(query: Tensor, layer: KVPolicyLayer, scaling: float, form: observe.AttentionForm) -> Tensor:
    """Sliding-window attention of the new queries ``[B, H, q, D]`` over an uncompressed layer (its entries are
    every token in order, the same in each row and head): query ``p`` sees positions ``p - window < pos <= p``.

    Queries go in chunks of :data:`WINDOW_CHUNK`; a chunk attends only the keys its window can reach, so a
    prefill costs ``O(L · window)`` and no mask is larger than ``[B, 1, chunk, chunk + window]``.
    """
    b, _, q, _ = query.shape
    w = form.window
    old = layer.physical_length - q
    pos = layer.positions[0, 0]  # [S] ascending
    plain = form.softcap is None and form.sinks is None
    outs = []
    for lo in range(0, q, WINDOW_CHUNK):
        hi = min(q, lo + WINDOW_CHUNK)
        first = layer.n_before + lo
        k0 = int(torch.searchsorted(pos, torch.tensor(first - w, device=pos.device), right=True))
        k1 = old + hi
        keys, values = layer.keys[:, :, k0:k1], layer.values[:, :, k0:k1]
        kpos, valid = layer.positions[:, :1, k0:k1], layer.valid[:, :1, k0:k1]  # [B, 1, n]
        qpos = torch.arange(first, layer.n_before + hi, device=query.device)  # [c]
        qc = query[:, :, lo:hi]
        if plain:
            rel = qpos[None, None, :, None] - kpos[:, :, None, :]  # [B, 1, c, n]
            vis = (valid[:, :, None, :] & (rel >= 0) & (rel < w)) | (rel == 0)  # a query always sees itself
            mask = torch.zeros(vis.shape, dtype=torch.float32, device=query.device).masked_fill_(~vis, float("-inf"))
            outs.append(sdpa(qc, keys, values, mask, scaling, causal=False))
        else:
            kv_valid = layer.valid[:, :, k0:k1]
            bias = torch.zeros(kv_valid.shape, device=query.device).masked_fill_(~kv_valid, float("-inf"))
            out, _ = observe.attention_with_colsum(
                qc, keys, values, scaling=scaling, query_pos=qpos.expand(b, -1), key_pos=layer.positions[:, :, k0:k1],
                key_bias=bias, query_valid=layer.valid[:, 0, old + lo:old + hi], form=form, sums=False)
            outs.append(out)
    return torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]


def kvpolicy_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                       attention_mask: Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                       **kwargs: Any) -> tuple[Tensor, None]:
    """The attention function registered as ``"kvpolicy"`` (transformers' AttentionInterface signature)."""
    cache = _BINDINGS.get(id(module))
    if cache is None:
        raise CacheUsageError("the 'kvpolicy' attention implementation only runs inside "
                              "`with kvpolicy.compress(model, policy) as cache:`")
    layer_idx = module.layer_idx
    layer = cache.layers[layer_idx]
    _check_attention_arguments(module, dropout, kwargs, layer.form)
    if not layer.holds(key):
        raise CacheUsageError(f"layer {layer_idx} attended over keys that are not the kvpolicy cache's: inside "
                              "kvpolicy.compress(), pass cache=cache (or past_key_values=cache) to "
                              "generate()/forward()")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    q_len = query.shape[2]
    out = cache.fused_prefill_attention(layer_idx, query, scale)
    if out is None:
        out = layer_attention(query, layer, scale)
    cache.after_attention(layer_idx, query, scale)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTN_NAME, kvpolicy_attention)

#: attention-function arguments the kvpolicy attention understands (they do not change what it computes)
_UNDERSTOOD = frozenset({"position_ids", "cache_position", "use_cache", "position_embeddings", "past_key_values",
                         "cache"})


def _check_attention_arguments(module: nn.Module, dropout: float, kwargs: dict[str, Any],
                               form: observe.AttentionForm) -> None:
    """Refuse, by name, any argument that would change the attention the kvpolicy function computes
    (dropout, non-causal attention, returned weights, ...). Soft-capping (``softcap``), sinks (``s_aux``) and
    sliding windows (``sliding_window``) are computed (``form``, read from the model when the block opened):
    they are accepted when they are what the layer's form says, refused otherwise."""
    expected = {"softcap": form.softcap, "sliding_window": form.window}
    for name, want in expected.items():
        got = kwargs.get(name)
        if got is not None and got == want:
            kwargs = {k: v for k, v in kwargs.items() if k != name}
    sinks = kwargs.get("s_aux")
    if isinstance(sinks, Tensor) and form.sinks is not None and sinks.shape == form.sinks.shape and (
            sinks is getattr(module, "sinks", None) or bool((sinks.detach().float() == form.sinks.float()).all())):
        kwargs = {k: v for k, v in kwargs.items() if k != "s_aux"}
    bad = sorted(k for k, v in kwargs.items() if k not in _UNDERSTOOD and v is not None and v is not False)
    if kwargs.get("is_causal") is True:
        bad.remove("is_causal")
    if dropout:
        bad.insert(0, f"dropout={dropout}")
    if bad:
        shown = ", ".join(b if "=" in b else f"{b}={_show(kwargs[b])}" for b in bad)
        raise UnsupportedModelError(
            f"{type(module).__name__} (layer {getattr(module, 'layer_idx', '?')}) calls its attention with {shown}, "
            f"which the kvpolicy attention does not implement (or which differs from the layer's form read from "
            f"the model: {_describe(form)}); allowed: causal softmax attention with a scaling factor, "
            f"soft-capping, sinks and a sliding window as the model declares them, in eval mode (no dropout)")


def _describe(form: observe.AttentionForm) -> str:
    parts = [f"softcap={form.softcap}" if form.softcap is not None else "",
             f"sinks {list(form.sinks.shape)}" if form.sinks is not None else "",
             f"sliding_window={form.window}" if form.window is not None else ""]
    return ", ".join(p for p in parts if p) or "plain"


def _show(v: Any) -> str:
    return f"<tensor {list(v.shape)}>" if isinstance(v, Tensor) else repr(v)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The decoder self-attention modules of the language model, in layer order."""
    found = [m for m in model.modules()
             if isinstance(getattr(m, "layer_idx", None), int) and getattr(m, "is_causal", False)
             and hasattr(m, "config")]
    return sorted(found, key=lambda m: m.layer_idx)


def check_model(model: nn.Module) -> tuple[Any, list[nn.Module]]:
    """Return ``(text_config, attention modules)`` or raise :class:`UnsupportedModelError`."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "get_text_config"):
        raise UnsupportedModelError(f"{type(model).__name__} is not a transformers PreTrainedModel; allowed: "
                                    f"decoder-only causal LMs and vision-language models from transformers")
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{type(model).__name__} is an encoder-decoder model; kvpolicy serves "
                                    f"decoder-only language models (and VLMs built on one)")
    text = config.get_text_config(decoder=True)
    if getattr(text, "kv_lora_rank", None):
        raise UnsupportedModelError(
            f"{type(model).__name__} uses multi-head latent attention (kv_lora_rank={text.kv_lora_rank}): its "
            f"keys and values are projected from a shared low-rank latent, which the kvpolicy cache does not "
            f"model; allowed: models whose attention caches per-head keys and values (MHA, GQA, MQA)")
    chunk = getattr(text, "attention_chunk_size", None)
    if chunk:
        raise UnsupportedModelError(
            f"{type(model).__name__} uses chunked attention (attention_chunk_size={chunk}), which the kvpolicy "
            f"attention does not implement; allowed: full-attention and sliding-window layers")
    types = getattr(text, "layer_types", None)
    if types is not None:
        bad = {i: t for i, t in enumerate(types) if t not in LAYER_TYPES}
        if bad:
            shown = ", ".join(f"{i}: {t!r}" for i, t in list(bad.items())[:6]) + (", ..." if len(bad) > 6 else "")
            raise UnsupportedModelError(
                f"{type(model).__name__} has layers the kvpolicy cache cannot serve ({shown}); allowed: "
                f"'full_attention' layers (compressed by the policy) and 'sliding_attention' layers (kept as sliding "
                f"windows); chunked-attention, linear-attention and state-space layers are not supported")
    mods = attention_modules(model)
    n = getattr(text, "num_hidden_layers", None)
    if not mods or n is None or len(mods) != n or [m.layer_idx for m in mods] != list(range(n)):
        raise UnsupportedModelError(
            f"{type(model).__name__}: found {len(mods)} causal self-attention modules with a layer_idx for "
            f"num_hidden_layers={n}; kvpolicy needs exactly one per layer (models that share KV across layers "
            f"or have no layer_idx are not supported)")
    return text, mods


#: the layer types kvpolicy serves (transformers' ``config.layer_types``)
LAYER_TYPES = ("full_attention", "sliding_attention")


def layer_forms(model: nn.Module, text: Any, mods: list[nn.Module]) -> list[observe.AttentionForm]:
    """Each layer's attention form: soft-capping (``attn_logit_softcapping``), learned sinks (a module's
    ``sinks``), and the window of a sliding-window layer (``layer_types``, or every layer of a model with a
    ``sliding_window`` and no layer types, as transformers' own cache reads it)."""
    types = getattr(text, "layer_types", None)
    window = getattr(text, "sliding_window", None)
    if types is None and not getattr(text, "use_sliding_window", True):
        window = None
    softcap = getattr(text, "attn_logit_softcapping", None)
    forms = []
    for m in mods:
        sliding = types[m.layer_idx] == "sliding_attention" if types is not None else window is not None
        if sliding and not isinstance(window, int):
            raise UnsupportedModelError(f"{type(model).__name__}: layer {m.layer_idx} is a sliding-window layer but "
                                        f"the config's sliding_window is {window!r}; allowed: a positive int")
        sinks = getattr(m, "sinks", None)
        forms.append(observe.AttentionForm(softcap=float(softcap) if softcap else None,
                                           sinks=sinks.detach() if isinstance(sinks, Tensor) else None,
                                           window=window if sliding else None))
    return forms


def visual_token_ids(model: nn.Module) -> list[int]:
    """Token ids that mark visual positions (image / video placeholders expanded in ``input_ids``)."""
    ids: list[int] = []
    for cfg in (model.config, model.config.get_text_config(decoder=True)):
        for attr in _VISUAL_TOKEN_ATTRS:
            v = getattr(cfg, attr, None)
            if isinstance(v, int) and v >= 0 and v not in ids:
                ids.append(v)
    return ids


@contextmanager
def compress(model: nn.Module, policy: Policy | str | dict | Any, *, tokenizer: Any = None,
             **overrides: Any) -> Iterator[KVPolicyCache]:
    """Compress ``model``'s KV cache with ``policy`` inside the block.

    ``policy`` is a :class:`~kvpolicy.policy.Policy` or anything :func:`kvpolicy.load_policy` takes
    (then ``overrides`` such as ``budget=0.2`` apply). Yields the cache to pass as
    ``model.generate(..., cache=cache)`` or ``model(..., cache=cache)``.
    Set ``cache.modality`` to a ``[B, L]`` bool mask (True = visual) to override modality detection.
    ``tokenizer`` encodes the prompt of a policy that re-reads its context (see :func:`reconstruct`);
    by default the model's own local tokenizer directory is used.
    """
    from kvpolicy.config import load_policy

    compat.check_transformers()
    if not isinstance(policy, Policy):
        policy = load_policy(policy, **overrides)
    elif overrides:
        policy = load_policy(policy.to_config(), **overrides)
    text, mods = check_model(model)
    for m in mods:
        if id(m) in _BINDINGS:
            raise CacheUsageError("this model is already inside a kvpolicy.compress() block; nest nothing")
    cache = KVPolicyCache(policy, len(mods), kv_heads=getattr(text, "num_key_value_heads", None),
                          forms=layer_forms(model, text, mods))
    cache.tokenizer = tokenizer
    visual = visual_token_ids(model)
    configs = {id(m.config): m.config for m in mods}
    saved = {k: c._attn_implementation_internal for k, c in configs.items()}

    def pre_hook(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
        passed = kwargs.get("past_key_values", kwargs.get("cache"))
        if passed is not cache and "Quantized" in type(passed).__name__:
            raise CacheUsageError(
                f"inside kvpolicy.compress() the model got a {type(passed).__name__} (generate(cache_implementation="
                f"'quantized') or a quantized cache passed in); kvpolicy's cache does not store quantized entries in "
                f"this version, and quantizing on top of it would report bytes it does not hold. Allowed: "
                f"cache=cache (the compressed fp16/bf16/fp32 cache), or a quantized cache outside kvpolicy.compress()")
        if passed is not cache:
            raise CacheUsageError("inside kvpolicy.compress(), call the model with cache=cache "
                                  f"(or past_key_values=cache) (got {type(passed).__name__})")
        ids = kwargs.get("input_ids", args[0] if args else None)
        _refuse_bidirectional_images(model, kwargs.get("token_type_ids"))
        emb = kwargs.get("inputs_embeds")
        q_len = ids.shape[1] if ids is not None else emb.shape[1]
        am = kwargs.get("attention_mask")
        valid = am[:, -q_len:].bool() if isinstance(am, Tensor) and am.dim() == 2 else None
        if valid is None:  # no mask: every token of every row is valid (the cache needs the batch size)
            src = ids if ids is not None else emb
            valid = torch.ones(src.shape[0], q_len, dtype=torch.bool, device=src.device)
        is_image = None
        if cache.modality is not None:  # consumed by this forward, accepted or refused
            override, cache.modality = cache.modality, None
            is_image = _modality_override(override, valid.shape[0], q_len)
        elif ids is not None and visual:
            is_image = torch.isin(ids, torch.tensor(visual, device=ids.device))
        cache.begin_forward(q_len, valid, is_image)
        cache.in_forward = True
        if cache.plan is not None and not cache.observing and q_len > 1:
            cache.plan_input = (ids, valid)  # the tokens the reconstruction pass re-reads

    def post_hook(_mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        try:
            # deferred prefill: re-read the context in observe-only mode, then compress every layer
            if cache.plan is None or cache.observing or not any(layer.deferred for layer in cache.layers):
                return
            if cache.needs_reconstruction():
                reconstruct(model, cache)
            cache.compress_deferred()
        finally:
            cache.in_forward = cache.observing  # a reconstruction forward runs inside the prefill's forward

    handle = model.register_forward_pre_hook(pre_hook, with_kwargs=True)
    post = model.register_forward_hook(post_hook, with_kwargs=True, always_call=True)
    try:
        for c in configs.values():
            c._attn_implementation_internal = ATTN_NAME
        for m in mods:
            _BINDINGS[id(m)] = cache
        cache.bound = True
        with (compat.cache_keyword(model), _refuse_drafting(model, policy),
              tracing.generate_span(policy.name, report=cache.report)):
            yield cache
    finally:
        cache.bound = False
        cache.in_forward = False
        handle.remove()
        post.remove()
        for m in mods:
            _BINDINGS.pop(id(m), None)
        for k, c in configs.items():
            c._attn_implementation_internal = saved[k]


#: models whose image tokens attend to each other in both directions (``token_type_ids`` marks them)
_BIDIRECTIONAL_IMAGES = ("gemma3", "paligemma", "gemma3n")


def _refuse_bidirectional_images(model: nn.Module, token_type_ids: Any) -> None:
    kind = getattr(model.config, "model_type", "")
    if kind in _BIDIRECTIONAL_IMAGES and isinstance(token_type_ids, Tensor) and bool((token_type_ids != 0).any()):
        raise UnsupportedModelError(
            f"{type(model).__name__} ({kind}) lets the image tokens marked by token_type_ids attend to each other in "
            f"both directions, which the kvpolicy attention (causal) does not implement; allowed: text-only "
            f"prompts on this model, or a VLM with causal image tokens (LLaVA, Qwen2-VL, Qwen2.5-VL)")


def _modality_override(mask: Any, batch: int, q_len: int) -> Tensor:
    """``cache.modality`` checked against the forward it applies to: a ``[B, q]`` bool (or 0/1) tensor."""
    if not isinstance(mask, Tensor) or tuple(mask.shape) != (batch, q_len):
        got = list(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise CacheUsageError(f"cache.modality is {got} but the next forward has {batch} rows of {q_len} tokens; "
                              f"allowed: a bool tensor [B={batch}, L={q_len}] (True = visual token), set right "
                              f"before the forward (or generate()) it describes")
    if mask.dtype != torch.bool and bool(((mask != 0) & (mask != 1)).any()):
        raise CacheUsageError("cache.modality holds values other than 0/1; allowed: a bool tensor (True = visual)")
    return mask.bool()


#: generate() arguments that draft tokens, verify them in one forward and crop the rejected ones
_DRAFTING = ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit", "assistant_tokenizer")


def _compresses(policy: Policy) -> bool:
    return getattr(policy.selector, "name", "") != "all" and policy.budget.ratio != 1.0


@contextmanager
def _refuse_drafting(model: nn.Module, policy: Policy) -> Iterator[None]:
    """Inside the block, ``generate()`` with assisted generation or prompt-lookup decoding is refused up front
    for a policy that compresses: the drafted tokens arrive as one multi-token forward, which the cache would
    compress before transformers crops the rejected ones. At a budget of 1.0 both run (and are exact)."""
    if not _compresses(policy):
        yield
        return

    def check(kwargs: dict[str, Any]) -> dict[str, Any]:
        cfg = kwargs.get("generation_config") or getattr(model, "generation_config", None)
        used = [k for k in _DRAFTING if kwargs.get(k) is not None or getattr(cfg, k, None) is not None]
        if used:
            raise CacheUsageError(
                f"generate({', '.join(f'{k}=...' for k in used)}) drafts tokens and verifies them in one forward, "
                f"then crops the rejected ones; policy {policy.name!r} compresses that forward before the crop "
                f"({policy.budget.describe()}). Allowed: plain greedy/sampled decoding with this policy, or "
                f"assisted generation / prompt lookup at budget 1.0 (e.g. kvpolicy.compress(model, 'full'))")
        return kwargs

    with compat.wrapped_generate(model, check):
        yield


def _plan_prompt_ids(model: nn.Module, cache: KVPolicyCache) -> list[int]:
    prompt = cache.plan.prompt
    if not prompt:
        return []
    tok = cache.tokenizer
    if tok is None:
        from transformers import AutoTokenizer

        src = getattr(model.config, "_name_or_path", "")
        try:
            tok = AutoTokenizer.from_pretrained(src, local_files_only=True)
        except (OSError, ValueError) as err:
            raise CacheUsageError(f"policy {cache.policy.name!r} re-reads its context after the prompt {prompt!r}, "
                                  f"which needs a tokenizer: pass kvpolicy.compress(..., tokenizer=tok) (loading "
                                  f"one from {src!r} failed: {err})") from None
        cache.tokenizer = tok
    return list(tok(prompt, add_special_tokens=False)["input_ids"])


def reconstruct(model: nn.Module, cache: KVPolicyCache) -> None:
    """The context-reconstruction pass of a deferred prefill (KVzip-style observation).

    Feeds the plan's prompt followed by the context tokens of the last prefill (teacher-forced), one
    forward per chunk of ``plan.chunk`` context tokens (every ``plan.stride``-th chunk, its first
    ``plan.tokens`` tokens), in the cache's observe-only mode: each layer records the max attention its
    entries receive from these queries, and the reconstruction entries are dropped after each layer's
    attention, so the cache is left as the prefill made it. Extra cost: about one prefill of the
    reconstructed tokens (plus the prompt per chunk) over the full cache.
    """
    plan = cache.plan
    ids, valid = getattr(cache, "plan_input", (None, None))
    if ids is None:
        raise CacheUsageError(f"policy {cache.policy.name!r} re-reads its context, which needs input_ids at the "
                              f"prefill (inputs_embeds alone cannot be re-read)")
    b, n = ids.shape
    prompt = torch.tensor(_plan_prompt_ids(model, cache), dtype=ids.dtype, device=ids.device).expand(b, -1)
    valid = valid if valid is not None else torch.ones(b, n, dtype=torch.bool, device=ids.device)
    cache.observing = True
    try:
        with torch.no_grad():
            for lo in range(0, n, plan.chunk * plan.stride):
                hi = min(n, lo + (plan.chunk if plan.tokens is None else min(plan.chunk, plan.tokens)))
                inp = torch.cat([prompt, ids[:, lo:hi]], dim=1)
                new = torch.cat([torch.ones_like(prompt, dtype=torch.bool), valid[:, lo:hi].bool()], dim=1)
                past = torch.ones(b, cache.get_seq_length(), dtype=torch.long, device=ids.device)
                model(input_ids=inp, attention_mask=torch.cat([past, new.long()], dim=1), cache=cache,
                      use_cache=True, logits_to_keep=1)
    finally:
        cache.observing = False
        cache.plan_input = (None, None)
