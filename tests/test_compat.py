"""Supported transformers releases: the declared range, and ``cache=`` really reaching the kvpolicy cache.

CI runs this file (with test_core, test_baselines, test_multimodal) on the lowest and the highest transformers
of the range pyproject.toml declares; a keyword that transformers swallows would leave the cache empty here.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

import kvpolicy
from kvpolicy import compat
from kvpolicy.errors import CacheUsageError, UnsupportedModelError


def test_installed_transformers_is_in_the_declared_range():
    spec = compat.supported_transformers()
    if spec is None:
        pytest.skip("kvpolicy is not installed as a distribution (no metadata to read the range from)")
    assert spec.startswith(">=") and ",<" in spec, f"declare a lower and an upper bound (got {spec!r})"
    assert compat.transformers_problem() is None, compat.transformers_problem()


def _entries(cache) -> list[int]:
    return [layer.physical_length for layer in cache.layers]


@pytest.mark.parametrize("keyword", ["cache", "past_key_values"])
def test_forward_with_the_cache_keyword_fills_and_compresses_the_kvpolicy_cache(tiny_llama, keyword):
    """``model(..., cache=cache)`` (the documented call) must reach the cache on every supported release:
    older ones take only ``past_key_values`` and would swallow ``cache`` into ``**kwargs``."""
    ids = torch.randint(3, 100, (1, 40))
    with torch.no_grad(), kvpolicy.compress(tiny_llama, "h2o", budget=0.25) as cache:
        tiny_llama(input_ids=ids, **{keyword: cache})
        assert _entries(cache) == [10, 10] and cache.get_seq_length() == 40
        tiny_llama(input_ids=ids[:, :1], **{keyword: cache})
    assert _entries(cache) == [11, 11] and cache.get_seq_length() == 41
    rows = cache.report().layers
    assert [r.tokens_seen for r in rows] == [41, 41] and all(r.events >= 1 for r in rows)


@pytest.mark.parametrize("keyword", ["cache", "past_key_values"])
def test_generate_with_the_cache_keyword_fills_and_compresses_the_kvpolicy_cache(tiny_llama, keyword):
    ids = torch.randint(3, 100, (2, 40))
    with torch.no_grad(), kvpolicy.compress(tiny_llama, "snapkv", budget=0.25) as cache:
        out = tiny_llama.generate(input_ids=ids, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                                  pad_token_id=0, **{keyword: cache})
    assert out.shape == (2, 44)
    assert cache.get_seq_length() == 43  # 40 prompt tokens + 3 decoded ones fed back (the 4th is not)
    assert _entries(cache) == [13, 13], "prefill compressed to int(0.25 * 40) = 10, then 3 decode steps"
    assert all(r.events >= 1 and r.bytes_now < r.bytes_full for r in cache.report().layers)


def test_model_is_restored_after_the_block(tiny_llama):
    generate = tiny_llama.generate
    with kvpolicy.compress(tiny_llama, "snapkv") as cache:
        tiny_llama(input_ids=torch.randint(3, 100, (1, 8)), cache=cache)
    assert "generate" not in tiny_llama.__dict__ and tiny_llama.generate == generate
    assert not tiny_llama._forward_pre_hooks and not tiny_llama._forward_hooks


class _PastKeyValuesOnly(nn.Module):
    """A model whose ``forward``/``generate`` take only ``past_key_values``, as transformers < 5.24's do (and
    whose ``generate`` refuses an unknown keyword, as theirs does): the renaming is tested on any release."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm, self.config = lm, lm.config
        self.seen: list[str] = []

    def forward(self, input_ids=None, attention_mask=None, past_key_values=None, **kwargs):
        assert "cache" not in kwargs, "the cache keyword reached a forward that would swallow it"
        return self.lm(input_ids=input_ids, attention_mask=attention_mask, **kwargs,
                       **compat.cache_kwargs(self.lm, past_key_values))

    def generate(self, input_ids, past_key_values=None, **kwargs):
        if kwargs:
            raise ValueError(f"The following `model_kwargs` are not used by the model: {sorted(kwargs)}")
        self.seen.append("generate")
        return self(input_ids=input_ids, past_key_values=past_key_values).logits


def test_cache_keyword_is_renamed_for_a_model_that_takes_only_past_key_values(tiny_llama):
    model = _PastKeyValuesOnly(tiny_llama)
    assert compat.cache_arg(model) == "past_key_values"
    ids = torch.randint(3, 100, (1, 40))
    with torch.no_grad(), kvpolicy.compress(model, "h2o", budget=0.25) as cache:
        assert "generate" in model.__dict__
        model(input_ids=ids, cache=cache)
        assert _entries(cache) == [10, 10]
        model.generate(ids[:, :1], cache=cache)
        assert model.seen == ["generate"] and _entries(cache) == [11, 11]
        model(input_ids=ids[:, :1], cache=cache, past_key_values=cache)  # both, the same object: fine
        with pytest.raises(CacheUsageError, match="both cache= and past_key_values="):
            model(input_ids=ids[:, :1], cache=cache, past_key_values=transformers.DynamicCache())
        with pytest.raises(CacheUsageError, match="call the model with cache=cache"):
            model(input_ids=ids[:, :1], cache=transformers.DynamicCache())
    assert "generate" not in model.__dict__ and not model._forward_pre_hooks
    with pytest.raises(ValueError, match="not used by the model"):  # outside the block: nothing renamed
        model.generate(ids, cache=cache)


@pytest.mark.parametrize("version", ["5.15.0", "4.57.6", "5.25.0", "6.0.0"])
def test_compress_refuses_a_transformers_outside_the_declared_range(tiny_llama, monkeypatch, version):
    spec = compat.supported_transformers()
    if spec is None:
        pytest.skip("kvpolicy is not installed as a distribution")
    monkeypatch.setattr(transformers, "__version__", version)
    monkeypatch.delenv(compat.ANY_VERSION_ENV, raising=False)
    with pytest.raises(UnsupportedModelError) as err:
        with kvpolicy.compress(tiny_llama, "snapkv"):
            pass
    msg = str(err.value)
    assert f"transformers {version} is installed" in msg and f"transformers{spec}" in msg
    assert compat.ANY_VERSION_ENV in msg
    assert tiny_llama.config._attn_implementation != "kvpolicy"
    monkeypatch.setenv(compat.ANY_VERSION_ENV, "1")  # the escape hatch: a warning, and it runs
    with pytest.warns(RuntimeWarning, match=f"transformers {version} is installed"):
        with kvpolicy.compress(tiny_llama, "snapkv") as cache:
            tiny_llama(input_ids=torch.randint(3, 100, (1, 8)), cache=cache)
    assert cache.get_seq_length() == 8


def test_range_check_accepts_the_bounds_it_declares():
    spec = compat.supported_transformers()
    if spec is None:
        pytest.skip("kvpolicy is not installed as a distribution")
    from packaging.specifiers import SpecifierSet

    lower = next(s.version for s in SpecifierSet(spec) if s.operator == ">=")
    upper = next(s.version for s in SpecifierSet(spec) if s.operator == "<")
    assert compat.transformers_problem(lower) is None
    assert compat.transformers_problem(upper) is not None
    assert compat.transformers_problem(upper + ".dev0") is not None  # a pre-release of the excluded bound


def test_embedded_tokenizer_has_the_special_tokens_the_gguf_declares(smollm2):
    """The GGUF conversion of transformers 5.16 took bos for eos and set no pad token (batched padding then
    fails); models.load_default sets them from the GGUF metadata, whichever release converted the model."""
    from kvpolicy import models

    model, tok = smollm2
    declared = models.gguf_special_tokens(models.embedded_gguf())
    assert declared == {"bos_token": 1, "eos_token": 2, "unk_token": 0, "pad_token": 2}
    assert {attr: getattr(tok, f"{attr}_id") for attr in declared} == declared
    assert tok.eos_token == tok.pad_token == "<|im_end|>" and model.generation_config.eos_token_id == 2
