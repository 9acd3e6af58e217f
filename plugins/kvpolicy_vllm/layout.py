"""Reading and writing a request's entries in vLLM's CPU paged cache.

Each layer's cache is ``[num_blocks, Hkv, block_size, 2·D]``, keys first, but the elements inside a block are
packed per instruction set (fp32: keys transposed; bf16 with AMX: VNNI tiles). Rather than re-deriving each
packing, the backend's own cache-write op writes index-coded probe entries into a scratch block once; where
each code lands is the map used to read entries back. Entries are written with the same op.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from vllm import _custom_ops as ops


def _halves(kv_cache: Tensor) -> tuple[Tensor, Tensor]:
    nb, hkv, bs, _ = kv_cache.shape
    return kv_cache.view(nb, hkv, bs * 2, -1).chunk(2, dim=2)


def _write(layer: Any, impl: Any, kv_cache: Tensor, keys: Tensor, values: Tensor, slots: Tensor) -> None:
    """The backend's cache write: ``keys``/``values`` ``[N, Hkv, D]`` into ``slots [N]``."""
    key_cache, value_cache = _halves(kv_cache)
    ops.cpu_attn_reshape_and_cache(keys, values, key_cache, value_cache, slots, layer.isa,
                                   k_scale=layer._k_scale_float, v_scale=layer._v_scale_float,
                                   kv_cache_dtype=impl.kv_cache_dtype)


@dataclass
class BlockLayout:
    """Where element ``(head, token, dim)`` of a block's keys and values lies in the block's flat storage."""

    key_at: Tensor  # [Hkv * bs * D] long
    value_at: Tensor  # [Hkv * bs * D] long
    kv_heads: int
    block_size: int
    head_dim: int

    def __post_init__(self) -> None:
        self._strides = {"key": self._affine(self.key_at), "value": self._affine(self.value_at)}

    def _affine(self, at: Tensor) -> tuple[int, int, int, int] | None:
        """``(offset, head stride, token stride, dim stride)`` when the packing is a plain strided layout (then a
        read is one strided copy instead of a gather), else None (e.g. VNNI tiles)."""
        a = at.view(self.kv_heads, self.block_size, self.head_dim)
        base = int(a[0, 0, 0])
        sh = int(a[1, 0, 0]) - base if self.kv_heads > 1 else 0
        st = int(a[0, 1, 0]) - base if self.block_size > 1 else 0
        sd = int(a[0, 0, 1]) - base if self.head_dim > 1 else 0
        h, t, d = (torch.arange(n).view(*shape) for n, shape in
                   ((self.kv_heads, (-1, 1, 1)), (self.block_size, (1, -1, 1)), (self.head_dim, (1, 1, -1))))
        return (base, sh, st, sd) if torch.equal(a, base + h * sh + t * st + d * sd) else None

    @classmethod
    def probe(cls, layer: Any, impl: Any, kv_cache: Tensor) -> BlockLayout:
        _, hkv, bs, d2 = kv_cache.shape
        d = d2 // 2
        n = hkv * bs * d
        exact = 2 ** 24 if kv_cache.dtype == torch.float32 else 256  # integers the dtype holds exactly
        base = min(exact - 1, n + 1)
        digits = max(1, math.ceil(math.log(n + 1) / math.log(base)))
        maps = []
        for kind in ("key", "value"):
            code = torch.zeros(2 * n, dtype=torch.long)
            where = None
            for i in range(digits):
                digit = (torch.arange(n) // base ** i) % base + 1  # 1..base: 0 marks "not written"
                entry = digit.view(hkv, bs, d).transpose(0, 1).to(kv_cache.dtype)  # [bs tokens, Hkv, D]
                zero = torch.zeros_like(entry)
                block = torch.zeros(1, hkv, bs, d2, dtype=kv_cache.dtype)
                k, v = (entry, zero) if kind == "key" else (zero, entry)
                _write(layer, impl, block, k.contiguous(), v.contiguous(), torch.arange(bs, dtype=torch.long))
                flat = block.reshape(-1).double().round().long()
                where = flat > 0 if where is None else where
                code += (flat - 1).clamp_min(0) * base ** i
            at = torch.full((n,), -1, dtype=torch.long)
            at[code[where]] = torch.nonzero(where).flatten()
            if int(where.sum()) != n or bool((at < 0).any()):
                raise RuntimeError(f"kvpolicy: could not learn the CPU cache packing of the {kind}s "
                                   f"({int(where.sum())} of {n} elements found; isa {layer.isa!r}, "
                                   f"{kv_cache.dtype})")
            maps.append(at)
        return cls(key_at=maps[0], value_at=maps[1], kv_heads=hkv, block_size=bs, head_dim=d)

    def read(self, kv_cache: Tensor, block_ids: list[int], n: int) -> tuple[Tensor, Tensor]:
        """The first ``n`` entries of a request whose blocks are ``block_ids``: keys, values ``[Hkv, n, D]``."""
        nb = -(-n // self.block_size)
        ids = torch.tensor(block_ids[:nb], dtype=torch.long)
        flat = kv_cache.index_select(0, ids).reshape(nb, -1)

        def unpack(kind: str, at: Tensor) -> Tensor:
            shape = (nb, self.kv_heads, self.block_size, self.head_dim)
            strided = self._strides[kind]
            if strided is None:
                x = flat[:, at].view(shape)
            else:
                base, sh, st, sd = strided
                x = flat.as_strided(shape, (flat.shape[1], sh, st, sd), flat.storage_offset() + base)
            return x.transpose(0, 1).reshape(self.kv_heads, nb * self.block_size, self.head_dim)[:, :n]

        return unpack("key", self.key_at), unpack("value", self.value_at)

    def write(self, layer: Any, impl: Any, kv_cache: Tensor, block_ids: list[int], keys: Tensor,
              values: Tensor) -> None:
        """Write ``keys``/``values`` ``[Hkv, K, D]`` as the request's first ``K`` entries (its physical slots)."""
        k = keys.shape[1]
        j = torch.arange(k)
        ids = torch.tensor(block_ids[: -(-k // self.block_size)], dtype=torch.long)
        slots = ids[j // self.block_size] * self.block_size + j % self.block_size
        _write(layer, impl, kv_cache, keys.transpose(0, 1).contiguous(), values.transpose(0, 1).contiguous(), slots)
