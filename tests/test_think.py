"""ThinK: key channels dropped from memory, against the masking form (pruned channels zeroed, kvpress's way)."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch

import kvpolicy
from kvpolicy.errors import CacheUsageError, ConfigError
from kvpolicy.policy import Merged
from kvpolicy.hookspecs import hookimpl
from kvpolicy.registry import register_plugin, unregister_plugin

from conftest import make_tiny_llama
from kvpolicy_presses.think import ThinK


class ZeroedThinK(ThinK):
    """The reference: the same channels, zeroed in full-width keys (nothing freed)."""

    name: ClassVar[str] = "think-zeroed-test"  # thins_keys stays True: it runs at budget 1.0 too

    def merge(self, ctx, selection, scores):  # noqa: ANN001, ANN201
        m = super().merge(ctx, selection, scores)
        keep = torch.zeros(m.keys.shape[:2] + m.keys.shape[-1:], dtype=torch.bool)
        keep.scatter_(-1, m.key_channels, True)
        return Merged(keys=m.keys * keep[:, :, None, :], values=m.values)


class _Reference:
    @hookimpl
    def kvpolicy_components(self) -> list[type]:
        return [ZeroedThinK]


@pytest.fixture(scope="module")
def model():
    register_plugin(_Reference(), "think-reference-test")
    yield make_tiny_llama(layers=2, heads=4, kv_heads=2, seed=3)
    unregister_plugin("think-reference-test")


def _policy(merger: str, ratio: float, decode: str = "none") -> dict:
    return {"name": f"{merger}-{ratio}", "budget": {"ratio": ratio, "sink": 2}, "scorer": {"name": "snapkv"},
            "selector": "topk", "merger": {"name": merger, "pruned": 0.5}, "decode": decode}


def _run(model, policy, ids, mask, new=8):  # noqa: ANN001
    with torch.no_grad(), kvpolicy.compress(model, policy) as cache:
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0,
                             cache=cache)
    return out, cache


@pytest.mark.parametrize("ratio", [1.0, 0.3])
def test_thinned_keys_attend_as_zeroed_channels_and_free_the_memory(model, ratio):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (2, 50), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    out, cache = _run(model, _policy("think", ratio), ids, mask)
    ref, ref_cache = _run(model, _policy("think-zeroed-test", ratio), ids, mask)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for layer, ref_layer in zip(cache.layers, ref_cache.layers, strict=True):
        kept = ref_layer.physical_length - 7  # the prefill's entries (7 decode tokens appended since)
        assert tuple(layer.thin_keys.shape) == (2, 2, kept, 8)  # D = 16 -> 8 channels held
        assert tuple(layer.keys.shape) == (2, 2, 7, 16)  # later keys: every channel
        assert bool((layer.channels[..., 1:] > layer.channels[..., :-1]).all())
    held, ref_held = cache.report().bytes_now, ref_cache.report().bytes_now
    assert held < ref_held
    # a row alone gives the same channels and output as the same row left-padded in the batch
    alone, alone_cache = _run(model, _policy("think", ratio), ids[1:, 7:], mask[1:, 7:])
    assert torch.equal(alone.sequences[0], out.sequences[1, 7:])
    assert torch.equal(alone_cache.layers[0].channels[0], cache.layers[0].channels[1])


def test_think_presets_and_refusals(model):
    ids = torch.randint(3, 128, (1, 40))
    with torch.no_grad(), kvpolicy.compress(model, "think") as cache:
        model(input_ids=ids, cache=cache)
        r = cache.report()
        assert r.bytes_now == pytest.approx(0.75 * r.bytes_full)  # keys at half width, values whole
        with pytest.raises(CacheUsageError, match=r"would compress layers whose keys policy 'think' already thinned"):
            model(input_ids=ids[:, :5], cache=cache)
        assert cache.get_seq_length() == 40, "refused before anything changed"
        cache.compressing = False  # a question read after the thinned context
        model(input_ids=ids[:, :5], cache=cache)
        assert cache.layers[0].physical_length == 45
    with pytest.raises(ConfigError, match=r"merger 'think' stores the kept keys in fewer channels once, but decode "
                                          r"rule 'rolling' compacts"):
        kvpolicy.load_policy(_policy("think", 0.3, decode="rolling"))
    from kvpolicy.serving import check_servable, parse_serve_config

    with pytest.raises(ConfigError, match=r"merger 'think' drops key channels \(ThinK\); a serving engine's KV "
                                          r"blocks hold every channel"):
        check_servable(parse_serve_config({"policy": "think-snapkv"}, "test"), 2)
