"""A transformers ``Cache`` whose layers are compressed by a :class:`~kvpolicy.policy.Policy`.

Each layer keeps, next to keys and values ``[B, Hkv, S, D]``, per-entry metadata ``[B, Hkv, S]``: the
logical position of the entry, whether it is valid (padding and filler slots are not), whether it is a
visual token, and an optional additive attention bias (``log`` of the number of tokens a merged entry
stands for). The cache counts the tokens it has seen (``n_seen``) apart from its physical length:
``get_seq_length()`` returns ``n_seen``, so transformers gives new tokens their true positions; the
kvpolicy attention function (:mod:`kvpolicy.integrate`) builds each layer's mask from the metadata, so
layers of different physical lengths and multi-token forwards after compression are both exact.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from transformers.cache_utils import Cache, DynamicLayer

from kvpolicy import contract, observe, ops, tracing
from kvpolicy.errors import CacheUsageError
from kvpolicy.policy import (Compact, CompressionContext, DecodeRule, DecodeView, KeepIndices, LayerBudget,
                             Merged, Policy, Selection)


@dataclass
class ForwardInfo:
    """Per-forward facts the model hook gives the cache: validity and modality of the new tokens."""

    q_len: int
    valid: Tensor | None = None  # [B, q] bool
    is_image: Tensor | None = None  # [B, q] bool
    all_valid: bool = False  # every new token of every row is valid (checked once per forward, not per layer)


PER_ENTRY = ("keys", "values", "positions", "valid", "is_image", "bias", "mult", "acc")
_PAD_FILL = {"mult": 1.0}  # padding slots of a ragged layer's dense view (valid False; others 0)
_APPEND_FILL = {"valid": True, "is_image": False, "bias": 0.0, "mult": 1.0, "acc": 0.0}  # a new valid text entry


class _Entry:
    """A per-entry tensor of a layer: stored dense, or (ragged layer) a padded dense view of its heads.

    Assigning one on a ragged layer first joins the heads back into dense storage.
    """

    def __set_name__(self, owner: type, name: str) -> None:
        self.name, self.slot = name, "_" + name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        if obj.__dict__.get("heads") is not None:
            return obj.padded(self.name)
        return obj.__dict__.get(self.slot)

    def __set__(self, obj: Any, value: Tensor | None) -> None:
        if obj.__dict__.get("heads") is not None:
            obj.join_heads()
        obj.__dict__[self.slot] = value


class KVPolicyLayer(DynamicLayer):
    """One layer's compressed cache. Metadata tensors are ``[B, Hkv, S]``.

    Storage is dense (every KV head holds ``S`` slots) until a selection keeps different counts per head
    (adaptive allocation): the layer then becomes *ragged*, ``heads`` holding one single-head layer
    ``[B, 1, S_h, D]`` per KV head with only its own entries (rows of a batch padded to the head's longest
    row), so the bytes held are the entries kept. The per-entry attributes stay readable as a padded dense
    view (built on each access: for compression events and reports, not for decoding); appends, crops and
    attention (:func:`kvpolicy.integrate.ragged_sdpa`) work head by head.
    """

    keys = _Entry()
    values = _Entry()
    positions = _Entry()
    valid = _Entry()
    is_image = _Entry()
    bias = _Entry()
    mult = _Entry()
    acc = _Entry()

    def __init__(self, layer_idx: int, form: observe.AttentionForm = observe.PLAIN) -> None:
        self.__dict__["heads"] = None  # list[KVPolicyLayer] when ragged; set first: the entries read it
        super().__init__()
        self.layer_idx = layer_idx
        #: the model's attention at this layer (soft-capping, sinks, sliding window); a layer with a window is
        #: a sliding-window layer: never compressed, it keeps the last ``window - 1`` tokens (see :meth:`trim`)
        self.form = form
        self.positions: Tensor | None = None
        self.valid: Tensor | None = None
        self.is_image: Tensor | None = None
        self.bias: Tensor | None = None  # fp32 log-multiplicity bias, None when all zero
        self.mult: Tensor | None = None  # fp32 tokens per entry, None when all one
        self.acc: Tensor | None = None  # accumulated attention (decode-time H2O accumulation)
        self.qbuf: Tensor | None = None  # [B, H, w, D] recent queries
        self.qbuf_pos: Tensor | None = None  # [B, w]
        self.recon: Tensor | None = None  # [B, Hkv, S] max attention from the reconstruction pass
        self.deferred = False  # prefill compression waits for the reconstruction pass
        self.saved_counts: tuple[int, int] = (0, 0)  # (n_before, image_seen) before an observe-only append
        self.n_seen = 0
        self.image_seen = 0  # valid visual tokens appended, summed over the batch
        self.scaling: float | None = None
        self.n_before = 0  # n_seen before the current forward
        self.pending = False  # compress after this forward's attention
        self.query_colsum: Tensor | None = None  # [B, Hkv, S] set by fused_prefill_attention for this event
        self.query_lse: Tensor | None = None  # [B, H, q] fp32: the prefill queries' log-sum-exp, for an estimate
        self.state: dict[str, Any] = {}
        self.events: list[tracing.CompressionEvent] = []
        self._buffers: dict[str, Tensor] = {}  # per-entry storage with spare room (see _extend)
        self.alloc_key: Tensor | None = None  # [B, Hkv, S] first-stage allocation keys (layer-pooling selectors)
        #: ThinK: the keys of the first ``S_t`` entries in their kept channels only, ``[B, Hkv, S_t, D']``, and
        #: those channels ``[B, Hkv, D']``; ``keys`` then holds the entries after them (every channel)
        self.thin_keys: Tensor | None = None
        self.channels: Tensor | None = None

    @property
    def is_sliding(self) -> bool:  # transformers' layer flag
        return self.form.window is not None

    @property
    def left_alone(self) -> str:
        """Why the policy does not compress this layer ("" when it does)."""
        return f"sliding window {self.form.window}: kept as a window" if self.is_sliding else ""

    # --- transformers layer API
    def get_seq_length(self) -> int:
        return self.n_seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.n_seen + query_length, 0

    @property
    def physical_length(self) -> int:
        """Slots per (row, KV head); for a ragged layer, those of its longest head."""
        if self.heads is not None:
            return max(h.physical_length for h in self.heads)
        k = self.__dict__.get("_keys")
        thin = 0 if self.__dict__.get("thin_keys") is None else self.thin_keys.shape[-2]
        return thin + (0 if k is None or k.dim() < 2 else k.shape[-2])

    @property
    def mean_length(self) -> int:
        """Entries per KV head on average: a ragged layer's heads hold their longest row each; a dense layer
        counts the same per head (its padded slots beyond a head's longest row are not entries), so decode
        rules see the same length in both layouts."""
        if self.heads is not None:
            return sum(h.physical_length for h in self.heads) // len(self.heads)
        valid = self.valid
        if valid is None or valid.dim() != 3 or valid.shape[-1] == 0:
            return self.physical_length
        return int(valid.sum(-1).amax(0).sum()) // valid.shape[1]

    def dims(self) -> tuple[int, int, int, int]:
        """``(batch, kv_heads, head_dim, bytes per element)`` without building a dense view."""
        if self.heads is not None:
            b, _, _, d = self.heads[0].keys.shape
            return b, len(self.heads), d, self.heads[0].keys.element_size()
        b, h, _, d = self.keys.shape
        return b, h, d, self.keys.element_size()

    def reset(self) -> None:
        self.__dict__["heads"] = None
        self.__init__(self.layer_idx, self.form)

    def _per_entry(self) -> list[str]:
        return list(PER_ENTRY)

    # --- ragged storage (adaptive allocation)
    def padded(self, name: str) -> Tensor | None:
        """Dense view ``[B, Hkv, S_max, ...]`` of a ragged layer's per-entry tensor ``name`` (a copy)."""
        heads = self.heads
        parts = [h.__dict__.get("_" + name) for h in heads]
        if all(p is None for p in parts):
            return None
        ref = next(p for p in parts if p is not None)
        smax = max(h.physical_length for h in heads)
        out = []
        for h, p in zip(heads, parts):
            n = h.physical_length
            shape = list(ref.shape)
            shape[2] = n
            if p is None:  # an optional tensor another head has (bias, mult, acc): its neutral value
                p = ref.new_full(shape, _PAD_FILL.get(name, 0.0))
            if n < smax:
                shape[2] = smax - n
                p = torch.cat([p, ref.new_full(shape, _PAD_FILL.get(name, 0.0))], dim=2)
            out.append(p)
        return torch.cat(out, dim=1)

    def join_heads(self) -> None:
        """Back to dense storage: every head padded to the longest one (padding slots invalid)."""
        if self.heads is None:
            return
        dense = {name: self.padded(name) for name in PER_ENTRY}
        self.__dict__["heads"] = None
        self.__dict__.update({"_" + name: t for name, t in dense.items()})
        self._buffers = {}

    def split_heads(self) -> bool:
        """Store each KV head apart, holding only its valid entries, if that frees memory; returns
        whether the layer is ragged now. Valid entries keep their order; invalid ones are dropped."""
        valid = self.valid
        if self.heads is not None or valid is None or valid.shape[1] == 1 or valid.shape[-1] == 0:
            return self.heads is not None
        need = valid.sum(-1).amax(0)  # [Hkv]: slots each head needs (its longest row)
        if int(need.min()) == int(need.max()):
            return False
        order = torch.sort((~valid).to(torch.int8), dim=-1, stable=True).indices  # valid first, in order
        dense = {name: self.__dict__.get("_" + name) for name in PER_ENTRY}
        heads = []
        for i, n in enumerate(need.tolist()):
            sub = KVPolicyLayer(self.layer_idx, self.form)
            sub.is_initialized, sub.device = True, self.device
            idx = order[:, i:i + 1, :n]
            for name, t in dense.items():
                if t is not None:
                    sub.__dict__["_" + name] = ops.gather_seq(t[:, i:i + 1], idx).contiguous()
            sub.n_seen, sub.n_before, sub.scaling = self.n_seen, self.n_before, self.scaling
            heads.append(sub)
        for name in PER_ENTRY:
            self.__dict__["_" + name] = None
        self.__dict__["heads"] = heads
        self._buffers = {}
        return True

    def holds(self, key: Tensor) -> bool:
        """Whether ``key`` is what :meth:`handles` gave the model for this layer's attention."""
        return key is self.handles()[0]

    def handles(self) -> tuple[Tensor, Tensor]:
        """What ``Cache.update`` returns to the model: the dense keys/values, or (ragged) the first head's
        (the kvpolicy attention reads the heads from the layer itself)."""
        if self.heads is not None:
            return self.heads[0].keys, self.heads[0].values
        return self.keys, self.values

    def valid_tail(self, n: int) -> Tensor:
        """Validity ``[B, n]`` of the last ``n`` tokens appended (the same in every head)."""
        src = self.heads[0] if self.heads is not None else self
        return src.valid[:, 0, -n:]

    def accumulate(self, query: Tensor, scaling: float, form: observe.AttentionForm | None = None) -> None:
        """Add one decode query's attention ``query [B, H, 1, D]`` to the accumulated statistic ``acc``."""
        form = self.form if form is None else form
        if self.heads is not None:
            g = query.shape[1] // len(self.heads)
            for i, h in enumerate(self.heads):
                h.accumulate(query[:, i * g:(i + 1) * g], scaling, form.group(i, g))
            return
        if self.acc is None:
            return
        qpos = torch.full((query.shape[0], query.shape[2]), self.n_seen - 1, device=query.device)
        self.acc = self.acc + observe.attention_colsum(
            query, self.keys, scaling=scaling, query_pos=qpos, key_pos=self.positions,
            key_bias=_bias_with_validity(self), form=form)

    def _map_batch(self, fn) -> None:  # noqa: ANN001
        names = ["qbuf", "qbuf_pos", "thin_keys", "channels"]
        if self.heads is not None:
            for h in self.heads:
                h._map_batch(fn)
        else:
            names += self._per_entry()
        for name in names:
            t = getattr(self, name)
            if t is not None and t.numel() > 0:
                setattr(self, name, fn(t))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._map_batch(lambda t: t[indices])

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the newest tokens: ``-n`` removes ``n`` (transformers >= 5.2x), ``0`` nothing, a positive
        ``m`` (the older form) everything after the first ``m`` tokens seen. Only tokens appended since the
        last compression can be removed (assisted generation, prompt lookup and rollbacks do this)."""
        n = self.check_crop(tokens_to_remove)
        if n <= 0:
            return
        if self.heads is not None:
            for h in self.heads:
                h.crop(tokens_to_remove)
        else:
            for name in self._per_entry():
                t = getattr(self, name)
                if t is not None:
                    setattr(self, name, t[..., :-n, :] if name in ("keys", "values") else t[..., :-n])
        self.n_seen -= n

    def check_crop(self, tokens_to_remove: int) -> int:
        """How many entries :meth:`crop` would remove (0: nothing); raises if some of them were compressed."""
        if self.heads is not None:
            return max(h.check_crop(tokens_to_remove) for h in self.heads)
        n = -tokens_to_remove if tokens_to_remove <= 0 else self.n_seen - tokens_to_remove
        if n <= 0 or self.positions is None or self.physical_length == 0:
            return 0
        # a window layer must still hold every token a query after the crop can see
        short = self.is_sliding and self.physical_length - n < min(self.form.window - 1, self.n_seen - n)
        if (n > self.physical_length or int(self.positions[..., -n:].min()) < self.n_seen - n or short
                or (self.thin_keys is not None and n > self.keys.shape[-2])):
            why = (f"fell out of its sliding window ({self.form.window})" if self.is_sliding else
                   "were compressed (merged or evicted) since they were appended")
            raise CacheUsageError(
                f"layer {self.layer_idx}: cannot remove the last {n} tokens: some of them {why}; only tokens "
                f"appended since the last compression can be removed")
        return n

    def trim(self, slack: int = 0) -> int:
        """A sliding-window layer drops what no later query can see: with more than ``window - 1 + slack``
        entries it keeps the last ``window - 1`` (copies, so the memory is freed). Returns the entries dropped.
        A decode step trims with slack (one copy every ``slack`` tokens); a multi-token forward without."""
        keep = self.form.window - 1
        n = self.physical_length
        if n <= keep + slack:
            return 0
        if keep == 0:  # a window of one token: each query sees only itself
            for name in self._per_entry():
                t = getattr(self, name)
                if t is not None:
                    setattr(self, name, (t[..., :0, :] if name in ("keys", "values") else t[..., :0]).clone())
            self._buffers = {}
            return n
        for name in self._per_entry():
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, (t[..., -keep:, :] if name in ("keys", "values") else t[..., -keep:]).clone())
        self._buffers = {}
        return n - keep

    # --- appending
    def append(self, key_states: Tensor, value_states: Tensor, info: ForwardInfo) -> None:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        b, h, q, _ = key_states.shape
        if self._append_in_place(key_states, value_states, info):
            self.n_before = self.n_seen
            self.n_seen += q
            return
        dev = key_states.device
        pos = torch.arange(self.n_seen, self.n_seen + q, device=dev).expand(b, h, q)
        valid = (info.valid.to(dev) if info.valid is not None and info.valid.shape == (b, q)
                 else torch.ones(b, q, dtype=torch.bool, device=dev))
        has_img = info.is_image is not None and info.is_image.shape == (b, q)
        img = info.is_image.to(dev) if has_img else torch.zeros(b, q, dtype=torch.bool, device=dev)
        valid = valid[:, None, :].expand(b, h, q)
        img = img[:, None, :].expand(b, h, q)
        new_all = info.all_valid or not (info.valid is not None and info.valid.shape == (b, q))
        was_all = self.heads is None and self.physical_length > 0 and self.all_valid()
        if self.heads is not None:
            for i, sub in enumerate(self.heads):
                sub.append(key_states[:, i:i + 1], value_states[:, i:i + 1], info)
        elif self.positions is None or self.physical_length == 0:
            self.keys, self.values = key_states, value_states
            self.positions, self.valid, self.is_image = pos.contiguous(), valid.contiguous(), img.contiguous()
        else:
            self._extend("keys", key_states)
            self._extend("values", value_states)
            self._extend("positions", pos)
            self._extend("valid", valid)
            self._extend("is_image", img)
            if self.bias is not None:
                self._extend("bias", self.bias.new_zeros(b, h, q))
            if self.mult is not None:
                self._extend("mult", self.mult.new_ones(b, h, q))
            if self.acc is not None:
                self._extend("acc", self.acc.new_zeros(b, h, q))
        if self.heads is None:  # appending keeps every old slot: all valid after = all before and all new
            fresh = self.physical_length == q
            self.__dict__["_valid_all"] = (self.__dict__.get("_valid"), new_all and (fresh or was_all))
        if has_img:  # (a text-only forward adds none: no reduction and sync per layer and step)
            self.image_seen += int((valid[:, 0] & img[:, 0]).sum())
        self.n_before = self.n_seen
        self.n_seen += q

    def _append_in_place(self, key_states: Tensor, value_states: Tensor, info: ForwardInfo) -> bool:
        """A decode step's fast path: valid text tokens appended to a dense layer whose per-entry tensors are
        all the views :meth:`_extend` made last time, with room left in their buffers: one write per tensor,
        no checks of what nothing changed. False (nothing done) whenever any of that does not hold."""
        d = self.__dict__
        views, bufs = d.get("_views"), self._buffers
        b, h, q, _ = key_states.shape
        if (views is None or d.get("heads") is not None or not info.all_valid or info.is_image is not None
                or (info.valid is not None and info.valid.shape != (b, q))):
            return False
        names = [name for name in PER_ENTRY if d.get("_" + name) is not None]
        if names[:5] != ["keys", "values", "positions", "valid", "is_image"]:
            return False
        n = d["_keys"].shape[-2]
        inference = torch.is_inference_mode_enabled()
        for name in names:
            cur, buf = d["_" + name], bufs.get(name)
            if (buf is None or views.get(name) is not cur or cur.shape[2] != n
                    or buf.shape[2] < n + q or buf.shape[:2] != (b, h) or (buf.is_inference() and not inference)):
                return False  # (a buffer made under inference mode cannot be written outside it: _extend moves it)
        was_all = self.all_valid()
        for name in names:  # what the checked path appends: the new entries, then each per-entry default
            buf = bufs[name]
            slot = buf.narrow(2, n, q)
            if name in ("keys", "values"):
                slot.copy_(key_states if name == "keys" else value_states)
            elif name == "positions":
                slot.copy_(torch.arange(self.n_seen, self.n_seen + q, device=buf.device).expand(b, h, q))
            else:  # valid True, is_image False, bias 0, mult 1, acc 0
                slot.fill_(_APPEND_FILL[name])
            view = buf.narrow(2, 0, n + q)
            d["_" + name] = view
            views[name] = view
        d["_valid_all"] = (d["_valid"], was_all)
        return True

    def _extend(self, name: str, new: Tensor) -> None:
        """Append ``new`` along the sequence axis of attribute ``name``, in place when there is room.

        Each per-entry tensor is a prefix view of a buffer with spare room (``len / 16``, at least 64
        entries), so a decode step writes one entry instead of copying the whole layer as ``torch.cat``
        does. A tensor that is not such a view (fresh from a prefill or a compression) moves into a new
        buffer once. Writes go past the current length only, so a view handed out earlier changes only
        where the layer was cropped since (nothing keeps such views).
        """
        cur: Tensor = getattr(self, name)
        dim = cur.dim() - (2 if name in ("keys", "values") else 1)
        n, q = cur.shape[dim], new.shape[dim]
        buf = self._buffers.get(name)
        # a buffer made under torch.inference_mode() cannot be written outside it (a second generate() without
        # inference mode on the same cache): move such a layer to a fresh buffer once, as after a compression
        stale = buf is not None and buf.is_inference() and not torch.is_inference_mode_enabled()
        if (buf is None or stale or buf.data_ptr() != cur.data_ptr() or buf.stride() != cur.stride()
                or buf.dtype != cur.dtype or buf.shape[dim] < n + q
                or any(buf.shape[i] != cur.shape[i] for i in range(cur.dim()) if i != dim)):
            size = list(cur.shape)
            size[dim] = n + q + max(64, (n + q) // 16)
            buf = cur.new_empty(size)
            buf.narrow(dim, 0, n).copy_(cur)
            self._buffers[name] = buf
        buf.narrow(dim, n, q).copy_(new)
        view = buf.narrow(dim, 0, n + q)
        setattr(self, name, view)
        self.__dict__.setdefault("_views", {})[name] = view

    def all_valid(self) -> bool:
        """Whether every slot of the layer is valid. Remembered for the very ``valid`` tensor it was found
        for (and carried by :meth:`append`, which only adds slots): a decode step reads no validity; any
        other assignment of ``valid`` (a compression, a ragged join, a rollback) makes it look again once."""
        v = self.valid
        if v is None:
            return True
        known = self.__dict__.get("_valid_all")
        if known is not None and known[0] is v:
            return known[1]
        found = bool(v.all())
        if self.__dict__.get("heads") is None:
            self.__dict__["_valid_all"] = (v, found)
        return found

    def attention_mask(self, q_len: int, query_valid: Tensor | None) -> Tensor | None:
        """Additive fp32 mask ``[B, Hkv or 1, q, S]`` for this forward, or None if plain causal suffices.

        Old entries are visible to every new query (their positions are all earlier) unless invalid; new
        entries are causal among themselves; a query always sees itself (no empty softmax rows).
        """
        s = self.physical_length
        old = s - q_len
        known = self.all_valid()
        per_head = self.bias is not None or (old > 0 and not known and not bool(self.valid[:, :, :old].all()))
        pads = not known and not bool(self.valid[:, 0, old:].all())  # (new slots: valid in every head alike)
        if not per_head and not pads and (q_len == 1 or old == 0):
            return None  # q == 1 sees everything; a fresh prefill is plain causal
        dev = self.keys.device
        qi = torch.arange(q_len, device=dev)
        ki = torch.arange(s, device=dev)
        causal = (ki[None, :] < old) | ((ki[None, :] - old) <= qi[:, None])  # [q, S]
        if per_head:
            vis = self.valid[:, :, None, :] & causal[None, None]  # [B, Hkv, q, S]
        else:
            vis = self.valid[:, :1, None, :] & causal[None, None]  # [B, 1, q, S]
        diag = torch.zeros(q_len, s, dtype=torch.bool, device=dev)
        diag[qi, old + qi] = True
        vis = vis | diag
        mask = torch.zeros(vis.shape, dtype=torch.float32, device=dev).masked_fill_(~vis, float("-inf"))
        if self.bias is not None:
            mask += self.bias[:, :, None, :]
        return mask

    def remember_queries(self, query: Tensor, window: int) -> None:
        """Keep the last ``window`` queries ``[B, H, w, D]`` for decode-time observations."""
        b, _, q, _ = query.shape
        pos = torch.arange(self.n_before, self.n_before + q, device=query.device).expand(b, q)
        if self.qbuf is None or q >= window:
            self.qbuf, self.qbuf_pos = query[:, :, -window:].detach(), pos[:, -window:]
        else:
            self.qbuf = torch.cat([self.qbuf, query.detach()], dim=2)[:, :, -window:]
            self.qbuf_pos = torch.cat([self.qbuf_pos, pos], dim=1)[:, -window:]

    # --- compression
    def apply(self, selection: Selection, merged: Merged | None, *, ragged: bool = True) -> None:
        """Replace the layer by the selected (and merged) entries; with ``ragged``, heads that keep
        different counts are then stored apart (:meth:`split_heads`)."""
        self.join_heads()
        if self.thin_keys is not None:
            raise CacheUsageError(f"layer {self.layer_idx}: its keys were already thinned (ThinK) and cannot be "
                                  f"compressed again")
        idx = ops.expand_heads(selection.indices, self.keys.shape[1])
        kept = ops.expand_heads(selection.kept, self.keys.shape[1])
        if merged is None:
            self.keys = ops.gather_seq(self.keys, idx)
            self.values = ops.gather_seq(self.values, idx)
        else:
            self.keys, self.values = merged.keys.contiguous(), merged.values.contiguous()
        self.positions = ops.gather_seq(self.positions, idx)
        self.valid = ops.gather_seq(self.valid, idx) & kept
        self.is_image = ops.gather_seq(self.is_image, idx)
        if self.acc is not None:
            self.acc = ops.gather_seq(self.acc, idx)
        if merged is not None and merged.multiplicity is not None:
            self.mult = merged.multiplicity.float()
        elif self.mult is not None:
            self.mult = ops.gather_seq(self.mult, idx)
        if merged is not None and merged.bias is not None:
            self.bias = merged.bias.float()
        elif self.bias is not None:
            self.bias = ops.gather_seq(self.bias, idx)
        if merged is not None and merged.key_channels is not None:
            self.thin(merged.key_channels)
        elif ragged and selection.indices.shape[1] > 1:
            self.split_heads()

    def thin(self, channels: Tensor) -> None:
        """Keep every entry's key in ``channels [B, Hkv, D']`` only (ThinK): the layer's keys become
        ``thin_keys`` (the other channels are freed); keys appended later keep every channel."""
        b, h, s, _ = self.keys.shape
        self.thin_keys = torch.gather(self.keys, -1, channels[:, :, None, :].expand(b, h, s, channels.shape[-1]))
        self.thin_keys = self.thin_keys.contiguous()
        self.channels = channels
        self.keys = self.keys[:, :, :0].contiguous()
        self._buffers = {}


class KVPolicyCache(Cache):
    """The cache that :func:`kvpolicy.compress` hands to ``model.generate(past_key_values=...)``."""

    def __init__(self, policy: Policy, n_layers: int, *, kv_heads: int | None = None,
                 forms: list[observe.AttentionForm] | None = None) -> None:
        forms = forms if forms is not None else [observe.PLAIN] * n_layers
        if len(forms) != n_layers:
            raise CacheUsageError(f"{len(forms)} attention forms for {n_layers} layers; give one per layer")
        super().__init__(layers=[KVPolicyLayer(i, f) for i, f in enumerate(forms)])
        self.policy = policy
        self.n_layers = n_layers
        self.kv_heads = kv_heads
        self._info: ForwardInfo | None = None
        self._budgets: list[LayerBudget] | None = None
        self.seen_valid: Tensor | None = None  # [B] valid tokens seen per row
        self.bound = False
        self.in_forward = False  # set by the model hooks of kvpolicy.compress() around each forward
        self.modality: Tensor | None = None  # [B, L] bool override for the next forward (True = visual)
        obs = policy.observations
        self._keep_acc = policy.decode.compacts and "accumulated_attention" in obs
        # the exact statistic is computed inside the prefill attention, unless a step opted into estimating
        # it from a stride of queries (CompressionContext.accumulated_attention; the others then reuse it)
        self._wants_acc = "accumulated_attention" in obs and all(
            getattr(step, "query_stride", 1) == 1 for step in policy.steps())
        # ... or the estimate reads the log-sum-exp that the prefill attention's kernel returns with it
        self._wants_lse = "accumulated_attention" in obs and not self._wants_acc
        self._qwindow = policy.decode.query_window if policy.decode.compacts else 0
        # deferred prefill (context reconstruction): see kvpolicy.integrate and ReconstructionPlan
        self.plan = policy.reconstruction()
        self.observing = False  # an observe-only forward: record attention, then drop its entries
        self.tokenizer: Any = None  # encodes the plan's prompt (kvpolicy.compress(..., tokenizer=))
        self.plan_input: tuple[Tensor | None, Tensor | None] = (None, None)  # prefill (ids, valid) to re-read
        #: store the KV heads of a layer apart when they keep different counts (False: pad every head to the
        #: longest, the dense masked layout; the same attention, more bytes)
        self.ragged = True
        # a selector pooling every layer (global allocation): layers keep a first-stage superset at prefill,
        # then _pool_layers() prunes them together
        self._pooled = policy.selector.spans_layers()
        #: the last layer the policy compresses: layer pooling runs after it (later layers are sliding windows)
        self._last_compressed = max((i for i, f in enumerate(forms) if f.window is None), default=n_layers - 1)
        #: a merger that thins keys (ThinK) runs even when the token budget keeps every entry
        self._thins = any(getattr(step, "thins_keys", False) for step in policy.steps())
        #: compress multi-token forwards (False: they are appended as they are, e.g. a question read after a
        #: compressed context, see kvpolicy.context); decode rules act either way
        self.compressing = True

    # --- called by the model hook (kvpolicy.integrate) before each forward
    def begin_forward(self, q_len: int, valid: Tensor | None, is_image: Tensor | None) -> None:
        """Register the new tokens of a forward; validate every layer's budget before anything changes."""
        self._info = ForwardInfo(q_len=q_len, valid=valid, is_image=is_image,
                                 all_valid=valid is None or bool(valid.all()))
        if self.observing:  # reconstruction tokens are not part of the sequence: nothing is counted
            return
        if q_len > 1 and self.compressing and any(layer.thin_keys is not None for layer in self.layers):
            raise CacheUsageError(
                f"a second multi-token forward would compress layers whose keys policy {self.policy.name!r} already "
                f"thinned (ThinK drops key channels once); allowed: cache.compressing = False to read these tokens "
                f"without compressing (as kvpolicy.CompressedContext does), or a new cache")
        new_valid = (valid.sum(-1).long() if valid is not None else None)
        if self.seen_valid is None:
            self.seen_valid = new_valid if new_valid is not None else torch.tensor([q_len])
        else:
            add = new_valid.to(self.seen_valid.device) if new_valid is not None else q_len
            self.seen_valid = self.seen_valid + add
        self._budgets = None
        if q_len > 1:  # a prefill event: resolve (and check) all budgets now, before layer 0 compresses
            self._budgets = [self.policy.layer_budget(i, self.n_layers, self.seen_valid.cpu())
                             for i in range(self.n_layers)]

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[Tensor, Tensor]:
        if not self.bound:
            raise CacheUsageError("this KVPolicyCache is not attached to a model: create it with "
                                  "`with kvpolicy.compress(model, policy) as cache:` and use it inside the block")
        if not self.in_forward:
            raise CacheUsageError(
                "this KVPolicyCache was updated by a forward that kvpolicy.compress() did not see (another model, "
                "or a model called outside its compress() block); a cache serves the model it was created for: "
                "use a new `with kvpolicy.compress(other_model, policy) as cache:` for another model")
        layer: KVPolicyLayer = self.layers[layer_idx]
        q = key_states.shape[-2]
        info = self._info if self._info is not None and self._info.q_len == q else ForwardInfo(q_len=q, all_valid=True)
        if q == 1 and layer.physical_length > 0 and not layer.is_sliding:
            self._decode_step(layer)
        if self.observing:
            layer.saved_counts = (layer.n_before, layer.image_seen)
        layer.append(key_states, value_states, info)
        layer.pending = q > 1 and not self.observing and self.compressing and not layer.is_sliding
        return layer.handles()

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].n_seen if layer_idx < len(self.layers) else 0

    def checkpoint(self) -> dict[str, Any]:
        """The cache's state now, for :meth:`rollback` (cheap: tensors are shared, not copied; appends after
        it write past the lengths it recorded, compressions build new tensors)."""
        return {"layers": [_layer_state(layer) for layer in self.layers],
                "cache": {k: self.__dict__[k] for k in ("seen_valid", "_info", "_budgets", "compressing")}}

    def rollback(self, state: dict[str, Any]) -> None:
        """Return to a :meth:`checkpoint`: every token appended (and every compression) since is undone."""
        for layer, d in zip(self.layers, state["layers"]):
            _restore_layer(layer, d)
        self.__dict__.update(state["cache"])

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the newest tokens from every layer (see :meth:`KVPolicyLayer.crop`); the per-row count of
        valid tokens seen goes back with them."""
        first: KVPolicyLayer = self.layers[0]
        n = -tokens_to_remove if tokens_to_remove <= 0 else first.n_seen - tokens_to_remove
        if n <= 0 or first.valid is None or first.physical_length == 0:
            return
        for layer in self.layers:  # every layer is checked before any changes
            layer.check_crop(tokens_to_remove)
        removed = first.valid_tail(n).sum(-1).long() if n <= first.physical_length else None
        for layer in self.layers:
            layer.crop(tokens_to_remove)
        if self.seen_valid is not None and removed is not None:
            self.seen_valid = self.seen_valid - removed.to(self.seen_valid.device)
        self._budgets = None

    # --- called by the attention function after a layer's attention
    def after_attention(self, layer_idx: int, query: Tensor, scaling: float) -> None:
        layer: KVPolicyLayer = self.layers[layer_idx]
        layer.scaling = scaling
        if layer.is_sliding:
            self._slide(layer, query.shape[2])
            return
        if self._qwindow:
            layer.remember_queries(query, self._qwindow)
        if self.observing:
            self._observe(layer, query, scaling)
        elif layer.pending and self.plan is not None:
            layer.pending = False
            layer.deferred = True  # compressed by compress_deferred() after the reconstruction pass
        elif layer.pending:
            layer.pending = False
            self._compress_prefill(layer, query, scaling)
            if self._pooled and layer.layer_idx == self._last_compressed:
                self._pool_layers()
        elif self._keep_acc:
            layer.accumulate(query, scaling)

    def _slide(self, layer: KVPolicyLayer, q: int) -> None:
        """A sliding-window layer after its attention: an observe-only forward's entries are dropped again;
        otherwise what fell out of the window is (at a multi-token forward: traced as a ``window`` event)."""
        if self.observing:
            layer.crop(-q)
            layer.n_before, layer.image_seen = layer.saved_counts
            return
        if q == 1:
            layer.trim(slack=max(64, layer.form.window // 16))
            return
        ev = self._event(layer, "prefill", "window")
        with tracing.compress_span(ev):
            layer.trim()
            ev.tokens_kept, ev.image_tokens_kept = _kept_counts(layer)
            ev.tokens_dropped = ev.tokens_in - ev.tokens_kept
            ev.bytes_after = _kv_bytes(layer)
            ev.figures = {"left_alone": layer.left_alone}
        layer.events.append(ev)

    def fused_prefill_attention(self, layer_idx: int, query: Tensor, scaling: float) -> Tensor | None:
        """The prefill attention ``[B, H, q, D]`` with its column sums kept for the compression that follows,
        or None when plain SDPA should run.

        A policy whose scorer needs the accumulated attention of every prefill query would otherwise
        compute ``Q·Kᵀ`` and the softmax twice (SDPA, then the statistic); see
        :func:`kvpolicy.observe.attention_with_colsum`. Only for inference (no autograd through it) and
        only when the layer compresses now or keeps the statistic for its decode rule.
        """
        layer: KVPolicyLayer = self.layers[layer_idx]
        if (not layer.pending or not (self._wants_acc or self._wants_lse) or self.plan is not None or self.observing
                or (query.requires_grad and torch.is_grad_enabled())):
            return None
        if not self._keep_acc and not _shrinks(self._budget(layer), layer):
            return None  # the layer keeps everything: nobody reads the statistic
        if self._wants_lse:
            if not layer.form.plain or layer.heads is not None or layer.thin_keys is not None:
                return None  # the estimate then samples whole softmax rows
            from kvpolicy.integrate import sdpa_with_lse  # the engine adapter imports this module

            q_len = query.shape[2]
            out, layer.query_lse = sdpa_with_lse(query, layer.keys, layer.values, layer.attention_mask(q_len, None),
                                                 scaling, q_len > 1)
            return out
        layer.join_heads()  # a ragged layer's prefill: one dense copy, split again by the compression
        qpos, qvalid = _event_queries(layer, query)
        out, layer.query_colsum = observe.attention_with_colsum(
            query, layer.keys, layer.values, scaling=scaling, query_pos=qpos, key_pos=layer.positions,
            key_bias=_bias_with_validity(layer), query_valid=qvalid, form=layer.form)
        return out

    def _budget(self, layer: KVPolicyLayer) -> LayerBudget:
        """The layer's budget for the current event (resolved once per prefill in ``begin_forward``)."""
        if self._budgets is not None:
            return self._budgets[layer.layer_idx]
        return self.policy.layer_budget(layer.layer_idx, self.n_layers, self.seen_valid.cpu())

    def _ctx(self, layer: KVPolicyLayer, phase: str, budget: LayerBudget, scaling: float, **kw: Any
             ) -> CompressionContext:
        if layer.thin_keys is not None:
            raise CacheUsageError(f"layer {layer.layer_idx}: a compression event on keys already thinned (ThinK); "
                                  f"allowed: decode 'none' and one compression per context (cache.compressing = False "
                                  f"reads later tokens without compressing)")
        layer.join_heads()  # one dense copy for the event (not one per attribute read); apply() splits again
        return CompressionContext(
            layer_idx=layer.layer_idx, n_layers=self.n_layers, phase=phase, keys=layer.keys,
            values=layer.values, positions=layer.positions, valid=layer.valid, is_image=layer.is_image,
            budget=budget, scaling=scaling, key_bias=_bias_with_validity(layer), accumulated=layer.acc,
            multiplicity=layer.mult, state=layer.state, form=layer.form, **kw)

    def _compress_prefill(self, layer: KVPolicyLayer, query: Tensor, scaling: float) -> None:
        budget = self._budget(layer)
        qpos, qvalid = _event_queries(layer, query)
        ctx = self._ctx(layer, "prefill", budget, scaling, queries=query, query_pos=qpos, query_valid=qvalid,
                        query_colsum=layer.query_colsum, query_lse=layer.query_lse)
        layer.query_colsum = layer.query_lse = None
        if not _shrinks(budget, layer) and not self._thins:
            if self._keep_acc:
                layer.acc = ctx.computed_accumulated()
            if self.ragged:
                layer.split_heads()  # _ctx joined a ragged layer for the event
            self._notify_prefill(layer)
            return
        self._run_policy(layer, ctx, "prefill", "compress")
        if not self._pooled:
            self._notify_prefill(layer)

    # --- deferred prefill (context reconstruction, driven by kvpolicy.integrate)
    def needs_reconstruction(self) -> bool:
        """True after a prefill whose compression waits for a reconstruction pass that would shrink a layer."""
        if not any(layer.deferred for layer in self.layers) or self._budgets is None:
            return False
        return any(layer.deferred and _shrinks(self._budgets[layer.layer_idx], layer) for layer in self.layers)

    def _observe(self, layer: KVPolicyLayer, query: Tensor, scaling: float) -> None:
        """Observe-only forward: max attention the older entries get from the new queries, then drop the new."""
        q = query.shape[2]
        old = layer.physical_length - q
        qpos, qvalid = _event_queries(layer, query)
        m = observe.attention_colmax(query, layer.keys, scaling=scaling, query_pos=qpos, key_pos=layer.positions,
                                     key_bias=_bias_with_validity(layer), query_valid=qvalid, form=layer.form)
        m = m[..., :old]
        layer.recon = m if layer.recon is None else torch.maximum(layer.recon, m)
        layer.crop(-q)
        layer.n_before, layer.image_seen = layer.saved_counts

    def compress_deferred(self) -> None:
        """Compress every deferred layer with the policy, the reconstruction observation in its context."""
        for layer in self.layers:
            if not layer.deferred:
                continue
            layer.deferred = False
            budget = self._budget(layer)
            if layer.recon is not None and _shrinks(budget, layer):
                ctx = self._ctx(layer, "prefill", budget, _scaling(layer), reconstruction=layer.recon)
                self._run_policy(layer, ctx, "prefill", "compress")
            layer.recon = None
            if not self._pooled:
                self._notify_prefill(layer)
        if self._pooled:
            self._pool_layers()

    def _pool_layers(self) -> None:
        """Second stage of a layer-pooling selector: every layer that kept a first-stage superset (with its
        allocation keys) is pruned to the counts the selector spends over all (layer, KV head) groups, the
        sum of the layers' budgets per row; then every layer's decode rule hears of the prefill."""
        pooled = [layer for layer in self.layers if layer.alloc_key is not None]
        if pooled:
            b, h = pooled[0].dims()[:2]
            smax = max(layer.physical_length for layer in pooled)
            dev = pooled[0].alloc_key.device
            keys = torch.full((b, len(pooled) * h, smax), float("-inf"), dtype=torch.float64, device=dev)
            valid = torch.zeros(keys.shape, dtype=torch.bool, device=dev)
            for j, layer in enumerate(pooled):
                key = ops.expand_heads(layer.alloc_key, h)
                layer.alloc_key = key
                s = key.shape[-1]
                keys[:, j * h:(j + 1) * h, :s] = key
                valid[:, j * h:(j + 1) * h, :s] = layer.valid & (key > float("-inf"))
            share = torch.stack([self._budget(layer).total.to(dev) for layer in pooled], dim=1)  # [B, layers]
            share = share.repeat_interleave(h, dim=1)  # [B, layers * h]
            counts = self.policy.selector.pool_counts(keys, valid, share)
            for j, layer in enumerate(pooled):
                c = counts[:, j * h:(j + 1) * h]
                key = layer.alloc_key
                layer.alloc_key = None
                ev = self._event(layer, "prefill", "pool")
                with tracing.compress_span(ev):
                    ok = valid[:, j * h:(j + 1) * h, :key.shape[-1]]
                    idx, kept = ops.topk_keep(key, max(1, int(c.max())), valid=ok, per_row=c)
                    self._finish_event(layer, ev, Selection(indices=idx, kept=kept), None, {})
        for layer in self.layers:
            self._notify_prefill(layer)

    def _notify_prefill(self, layer: KVPolicyLayer) -> None:
        if not layer.is_sliding:
            self.policy.decode.on_prefill(self._view(layer))

    def _view(self, layer: KVPolicyLayer) -> DecodeView:
        n_valid = self.seen_valid.cpu()
        lb = self.policy.layer_budget(layer.layer_idx, self.n_layers, n_valid)
        return DecodeView(layer_idx=layer.layer_idx, n_layers=self.n_layers, n_seen=layer.n_seen,
                          length=layer.physical_length, target=int(lb.total.max()), state=layer.state, budget=lb,
                          entries=layer.mean_length)

    def _run_policy(self, layer: KVPolicyLayer, ctx: CompressionContext, phase: str, event_name: str) -> None:
        ev = self._event(layer, phase, event_name)
        with tracing.compress_span(ev):
            selection, merged = self.policy.compress(ctx)
            if self._keep_acc:
                layer.acc = ctx.computed_accumulated()
            first_stage = self._pooled and phase == "prefill"
            if first_stage and selection.key is None:
                raise CacheUsageError(f"selector {self.policy.selector.name!r} pools layers but returned no "
                                      f"allocation keys (Selection.key) at layer {layer.layer_idx}")
            self._finish_event(layer, ev, selection, merged, ctx.figures, ragged=not first_stage)
            if first_stage:
                kept = ops.expand_heads(selection.kept, selection.key.shape[1])
                layer.alloc_key = torch.where(kept, selection.key.double(), float("-inf"))

    def _event(self, layer: KVPolicyLayer, phase: str, event_name: str) -> tracing.CompressionEvent:
        p = self.policy
        ev = tracing.CompressionEvent(layer=layer.layer_idx, phase=phase, policy=p.name, scorer=p.scorer.name,
                                      merger=p.merger.name, event=event_name, batch=layer.dims()[0])
        ev.tokens_in, ev.image_tokens_in = _kept_counts(layer)
        ev.bytes_before = _kv_bytes(layer)
        return ev

    def _finish_event(self, layer: KVPolicyLayer, ev: tracing.CompressionEvent, selection: Selection,
                      merged: Merged | None, figures: dict[str, Any], *, ragged: bool = True) -> None:
        layer.apply(selection, merged, ragged=ragged and self.ragged)
        ev.tokens_kept, ev.image_tokens_kept = _kept_counts(layer)
        ev.tokens_merged = int(merged.merged) if merged is not None else 0
        ev.tokens_dropped = ev.tokens_in - ev.tokens_kept - ev.tokens_merged
        ev.bytes_after = _kv_bytes(layer)
        ev.figures = dict(figures)
        layer.events.append(ev)

    def _decode_step(self, layer: KVPolicyLayer) -> None:
        rule = self.policy.decode
        if type(rule).on_decode is DecodeRule.on_decode:
            return  # a rule that never acts while decoding (e.g. "none"): skip building its view
        action = rule.on_decode(self._view(layer))
        if action is None:
            return
        if isinstance(action, KeepIndices):
            ev = self._event(layer, "decode", action.event)
            with tracing.compress_span(ev):
                idx = action.indices
                sel = Selection(indices=idx.clamp_min(0), kept=idx >= 0 if action.kept is None else action.kept)
                budget = self.policy.layer_budget(layer.layer_idx, self.n_layers, self.seen_valid.cpu())
                # a kept pad stays an invalid slot (apply() ands validity in), so pads may be listed here
                contract.check_selection(rule, self._ctx(layer, "decode", budget, _scaling(layer)), sel,
                                         pads_allowed=True)
                self._finish_event(layer, ev, sel, None, {})
            return
        if isinstance(action, Compact):
            n_valid = self.seen_valid.cpu()
            budget = self.policy.layer_budget(layer.layer_idx, self.n_layers, n_valid)
            kw: dict[str, Any] = {}
            if layer.qbuf is not None:
                kw = dict(queries=layer.qbuf, query_pos=layer.qbuf_pos)
            ctx = self._ctx(layer, "decode", budget, _scaling(layer), **kw)
            self._run_policy(layer, ctx, "decode", "compact")
            return
        raise CacheUsageError(f"decode rule {self.policy.decode.name!r} returned {action!r}; allowed: "
                              f"None, Compact() or KeepIndices(indices)")

    # --- reporting
    def report(self) -> CacheReport:
        """Per-layer figures: tokens seen / kept / merged, KV bytes before / after, time compressing."""
        rows = []
        for layer in self.layers:
            if layer.heads is None and layer.keys is None:
                continue
            evs = layer.events
            b, h, d, esize = layer.dims()
            full = b * h * layer.n_seen * d * esize * 2
            kept, image_kept = _kept_counts(layer)
            rows.append(LayerReport(
                layer=layer.layer_idx, tokens_seen=layer.n_seen, entries=layer.physical_length,
                tokens_kept=kept // max(1, b),
                tokens_merged=sum(e.tokens_merged for e in evs) // max(1, b),
                image_tokens_in=layer.image_seen // max(1, b),
                image_tokens_kept=image_kept // max(1, b),
                bytes_full=full, bytes_now=_kv_bytes(layer), seconds=sum(e.seconds for e in evs),
                events=len(evs), left_alone=layer.left_alone))
        return CacheReport(policy=self.policy.name, layers=rows)


def _layer_state(layer: KVPolicyLayer) -> dict[str, Any]:
    d = dict(layer.__dict__)
    d["state"] = copy.deepcopy(layer.state)
    d["events"] = list(layer.events)
    d["_buffers"] = dict(layer._buffers)
    if layer.heads is not None:  # a ragged layer: its heads are layers of their own
        d["heads"] = [(head, _layer_state(head)) for head in layer.heads]
    return d


def _restore_layer(layer: KVPolicyLayer, d: dict[str, Any]) -> None:
    layer.__dict__.clear()
    layer.__dict__.update(d)
    layer.state = copy.deepcopy(d["state"])
    layer.events = list(d["events"])
    layer._buffers = dict(d["_buffers"])
    if d["heads"] is not None:
        for head, hd in d["heads"]:
            _restore_layer(head, hd)
        layer.__dict__["heads"] = [head for head, _ in d["heads"]]


def _kv_bytes(layer: KVPolicyLayer) -> int:
    """Bytes the layer's keys and values really hold (a ragged layer: the sum over its heads)."""
    if layer.heads is not None:
        return sum(_kv_bytes(h) for h in layer.heads)
    thin = 0 if layer.thin_keys is None else layer.thin_keys.numel() * layer.thin_keys.element_size()
    return thin + layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()


def _kept_counts(layer: KVPolicyLayer) -> tuple[int, int]:
    """Valid entries and valid visual entries, summed over the rows, averaged over the KV heads."""
    parts = layer.heads if layer.heads is not None else [layer]
    h = sum(p.valid.shape[1] for p in parts)
    n = sum(int(p.valid.sum()) for p in parts)
    img = sum(int((p.valid & p.is_image).sum()) for p in parts)
    return n // h, img // h


def _scaling(layer: KVPolicyLayer) -> float:
    return layer.scaling if layer.scaling is not None else layer.dims()[2] ** -0.5


def _event_queries(layer: KVPolicyLayer, query: Tensor) -> tuple[Tensor, Tensor]:
    """``(positions [B, q], validity [B, q])`` of the ``q`` queries just appended to ``layer``."""
    b, _, q, _ = query.shape
    return torch.arange(layer.n_before, layer.n_seen, device=query.device).expand(b, q), layer.valid_tail(q)


def _shrinks(budget: LayerBudget, layer: KVPolicyLayer) -> bool:
    """Whether some row of ``layer`` holds more valid entries than ``budget`` keeps."""
    return bool((budget.total < layer.valid.sum(-1).amax(1).cpu()).any())


def _bias_with_validity(layer: KVPolicyLayer) -> Tensor | None:
    if layer.bias is None and bool(layer.valid.all()):
        return None
    bias = layer.bias if layer.bias is not None else torch.zeros(layer.valid.shape, device=layer.keys.device)
    return bias.masked_fill(~layer.valid, float("-inf"))


@dataclass
class LayerReport:
    layer: int
    tokens_seen: int
    entries: int  # physical entries per (row, head)
    tokens_kept: int  # valid entries per row (mean over the batch)
    tokens_merged: int
    image_tokens_in: int
    image_tokens_kept: int
    bytes_full: int  # KV bytes an uncompressed cache would hold now
    bytes_now: int
    seconds: float
    events: int
    left_alone: str = ""  # why the policy does not compress this layer (e.g. a sliding-window layer)


@dataclass
class CacheReport:
    """Per-layer report; ``str(report)`` renders a table."""

    policy: str
    layers: list[LayerReport] = field(default_factory=list)

    @property
    def bytes_full(self) -> int:
        return sum(r.bytes_full for r in self.layers)

    @property
    def bytes_now(self) -> int:
        return sum(r.bytes_now for r in self.layers)

    @property
    def seconds(self) -> float:
        return sum(r.seconds for r in self.layers)

    def as_dicts(self) -> list[dict[str, Any]]:
        from dataclasses import asdict
        return [asdict(r) for r in self.layers]

    def __str__(self) -> str:
        head = (f"{'layer':>5} {'seen':>6} {'kept':>6} {'merged':>6} {'img in':>6} {'img kept':>8} "
                f"{'KV full':>10} {'KV now':>10} {'ms':>8}")
        lines = [f"kvpolicy cache report - policy {self.policy}", head]
        for r in self.layers:
            lines.append(f"{r.layer:>5} {r.tokens_seen:>6} {r.tokens_kept:>6} {r.tokens_merged:>6} "
                         f"{r.image_tokens_in:>6} {r.image_tokens_kept:>8} {_fmt_bytes(r.bytes_full):>10} "
                         f"{_fmt_bytes(r.bytes_now):>10} {r.seconds * 1e3:>8.1f}"
                         + (f"  ({r.left_alone})" if r.left_alone else ""))
        ratio = self.bytes_now / self.bytes_full if self.bytes_full else 1.0
        lines.append(f"total: KV {_fmt_bytes(self.bytes_full)} -> {_fmt_bytes(self.bytes_now)} "
                     f"({ratio:.1%}), compression time {self.seconds * 1e3:.1f} ms")
        return "\n".join(lines)


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
