"""The invariant kit (kvpolicy.testing) applied to every registered component and preset, config fuzzing,
and proof that the kit catches broken components.

Parametrized over the registry: a plugin that registers through an entry point is covered automatically.
``KVPOLICY_HYPOTHESIS_PROFILE=thorough`` runs many more examples.
"""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

import kvpolicy
from kvpolicy import testing as kit
from kvpolicy.errors import ConfigError, StepOutputError
from kvpolicy.policy import CompressionContext, Merged, Merger, Scorer, Selection, Selector, gather_kept
from kvpolicy.registry import KINDS, get_registry, register_plugin, unregister_plugin

_REG = get_registry()
NO_SHRINK = settings(kit.profile("ci"), phases=[Phase.explicit, Phase.reuse, Phase.generate])  # fail fast
PRESETS = _REG.names("preset")
COMPONENTS = [(kind, name) for kind in KINDS for name in _REG.names(kind)]
# a component used by a preset is checked, with that preset's companions, by the preset's test; the others
# are checked on their own (composed with kvpolicy.testing.BASE_CONFIG)
ALONE = [(kind, name) for kind, name in COMPONENTS if kit.companion_preset(kind, name) is None]


@pytest.mark.parametrize("name", PRESETS)
def test_preset_keeps_the_invariants(name):
    kit.check_preset(name)


@pytest.mark.parametrize("kind, name", ALONE, ids=[f"{k}-{n}" for k, n in ALONE])
def test_component_keeps_the_invariants(kind, name):
    # decode rules and schedules only act through the cache: the tiny-model checks exercise them
    kit.check_component(kind, name, model=kind in ("decode", "schedule"))


def test_every_registered_component_is_covered():
    in_presets = {(kind, kit._step_name(_REG.preset(p).config.get(field)))
                  for p in PRESETS for kind, field in kit._FIELD_OF_KIND.items()}
    assert set(COMPONENTS) <= in_presets | set(ALONE)
    for kind, name in set(COMPONENTS) - set(ALONE):
        preset = kit.companion_preset(kind, name)
        assert kit.component_config(kind, name)[kit._FIELD_OF_KIND[kind]] == _REG.preset(preset).config[
            kit._FIELD_OF_KIND[kind]]


def test_config_fuzzing_valid_configs_compress_invalid_ones_raise_config_error():
    kit.check_configs()


# --------------------------------------------------------------------------------------------- the kit can fail
class _MutatingMerger(Merger):
    """Scales the input keys in place (a bug)."""

    name: ClassVar[str] = "test-mutating"

    def merge(self, ctx: CompressionContext, selection: Selection, scores: torch.Tensor) -> Merged:
        ctx.keys.mul_(1.0)
        ctx.values.add_(1.0)
        k, v = gather_kept(ctx, selection)
        return Merged(keys=k, values=v)


class _PadKeepingSelector(Selector):
    """Keeps the first entries whatever their validity (a bug with left padding)."""

    name: ClassVar[str] = "test-keeps-pads"

    def select(self, ctx: CompressionContext, scores: torch.Tensor, priority: torch.Tensor | None) -> Selection:
        b, _, s = ctx.shape
        k = int(ctx.budget.total.max())
        idx = torch.arange(k).expand(b, 1, k)
        return Selection(indices=idx, kept=torch.ones_like(idx, dtype=torch.bool))


class _OverPromisingMerger(Merger):
    """Averages every evicted entry into the first kept one but claims pure eviction (gather)."""

    name: ClassVar[str] = "test-overpromising"
    promises: ClassVar[frozenset[str]] = frozenset({"gather"})

    def merge(self, ctx: CompressionContext, selection: Selection, scores: torch.Tensor) -> Merged:
        k, v = gather_kept(ctx, selection)
        k, v = k.clone(), v.clone()
        k[:, :, 0] = ctx.keys.float().mean(2).to(k.dtype)
        return Merged(keys=k, values=v)


class _NaNMerger(Merger):
    """Divides merged values by the key norm (NaN for zero-norm keys)."""

    name: ClassVar[str] = "test-nan-merge"

    def merge(self, ctx: CompressionContext, selection: Selection, scores: torch.Tensor) -> Merged:
        k, v = gather_kept(ctx, selection)
        return Merged(keys=k, values=(v.float() / k.float().norm(dim=-1, keepdim=True)).to(v.dtype))


class _NaNScorer(Scorer):
    """Key norms, but NaN for every other entry (a bug)."""

    name: ClassVar[str] = "test-nan-score"

    def score(self, ctx: CompressionContext) -> torch.Tensor:
        sc = ctx.key_norms().clone()
        sc[..., ::2] = float("nan")
        return sc


class _WrongShapeScorer(Scorer):
    """Returns one score per (row, head) instead of one per entry."""

    name: ClassVar[str] = "test-wrong-shape"

    def score(self, ctx: CompressionContext) -> torch.Tensor:
        return ctx.key_norms().sum(-1, keepdim=True)


class _HalfMerger(Merger):
    """Gathers the kept entries but returns them in bf16 whatever the cache dtype."""

    name: ClassVar[str] = "test-bf16-merge"

    def merge(self, ctx: CompressionContext, selection: Selection, scores: torch.Tensor) -> Merged:
        k, v = gather_kept(ctx, selection)
        return Merged(keys=k.bfloat16(), values=v.bfloat16())


class _PaddingSensitiveScorer(Scorer):
    """Scores by physical slot: a left-padded row ranks its entries differently than alone."""

    name: ClassVar[str] = "test-slot-score"

    def score(self, ctx: CompressionContext) -> torch.Tensor:
        b, h, s = ctx.shape
        return (torch.arange(s) % 3).float().expand(b, 1, s)


class _ValueNormScorer(Scorer):
    """A correct scorer that reads the values (their norm): merges after it must still pass "convex"."""

    name: ClassVar[str] = "test-value-norm"

    def score(self, ctx: CompressionContext) -> torch.Tensor:
        return ctx.values.float().norm(dim=-1)


class _BrokenPlugin:
    @kvpolicy.hookimpl
    def kvpolicy_components(self) -> list[type]:
        return [_MutatingMerger, _PadKeepingSelector, _OverPromisingMerger, _NaNMerger, _NaNScorer,
                _WrongShapeScorer, _HalfMerger, _PaddingSensitiveScorer, _ValueNormScorer]


@pytest.fixture
def broken():
    register_plugin(_BrokenPlugin(), "test-broken-components")
    yield
    unregister_plugin("test-broken-components")


@pytest.mark.parametrize("kind, name, prop", [
    ("merger", "test-mutating", r"\[inputs not mutated\]"),
    ("selector", "test-keeps-pads", r"\[pads never kept\]"),
    ("merger", "test-overpromising", r"\[gather\]"),
    ("scorer", "test-nan-score", r"\[finite\](.|\n)*scorer 'test-nan-score' \(plugin 'test-broken-components'"),
    ("scorer", "test-wrong-shape", r"\[shape\](.|\n)*returned scores of shape \[\d, \d, 1\]"),
    ("merger", "test-bf16-merge", r"\[dtype/device\](.|\n)*keys in torch.bfloat16"),
    ("scorer", "test-slot-score", r"\[batch independence\]"),
])
def test_the_kit_catches_broken_components(broken, kind, name, prop):
    with pytest.raises(kit.InvariantError, match=prop):
        kit.check_component(kind, name, model=False, hypothesis_settings=NO_SHRINK)


@pytest.mark.parametrize("component, pattern", [
    ({"scorer": "test-nan-score"}, r"scorer 'test-nan-score' \(plugin 'test-broken-components', distribution "
                                   r"'\(registered at run time\)'\) returned NaN scores for \d+ valid entries"),
    ({"scorer": "test-wrong-shape"}, r"returned scores of shape \[2, 2, 1\] for layer 0 \(prefill\); allowed: "
                                     r"a tensor of shape \[B=2, Hkv=2 or 1, S=40\]"),
    ({"merger": "test-bf16-merge"}, r"merger 'test-bf16-merge' .* returned keys in torch.bfloat16 on cpu .*allowed: "
                                    r".*in torch.float32"),
])
def test_bad_step_outputs_are_refused_where_they_happen(broken, component, pattern):
    """The cache checks every step's output: a clear error naming the component and its plugin, raised in
    the prefill (not a torch broadcast error in top-k, garbage tokens, or a failure in SDPA later)."""
    model = kit.tiny_model()
    ids, mask, _ = kit._prompt(40)
    policy = kvpolicy.load_policy({"budget": 0.5, "scorer": "knorm", **component})
    with torch.no_grad(), kvpolicy.compress(model, policy) as cache:
        with pytest.raises(StepOutputError, match=pattern):
            model(input_ids=ids, attention_mask=mask, cache=cache)


def test_the_kit_finds_nan_with_zero_norm_keys(broken):
    with pytest.raises(kit.InvariantError, match=r"\[finite\](.|\n)*pattern='zero_keys'"):
        kit.check_component("merger", "test-nan-merge", model=False, hypothesis_settings=NO_SHRINK)


def test_check_case_and_check_on_model(broken):
    policy = kvpolicy.load_policy({"budget": 0.5, "scorer": "knorm", "merger": "test-mutating"})
    kit.check_on_model(kvpolicy.load_policy("snapkv"))  # a correct policy passes
    with pytest.raises(kit.InvariantError):
        kit.check_case(policy, kit.Case(batch=1, kv_heads=1, group=1, seq=8, head_dim=4, dtype=torch.float32,
                                        pads=(0,), pattern="random", image_share=0.0, budget={"tokens": 3},
                                        layer_idx=0, n_layers=1, seed=0))


# --------------------------------------------------------------------------------------------- kit plumbing
def test_profiles(monkeypatch):
    monkeypatch.delenv(kit.PROFILE_ENV, raising=False)
    assert kit.profile().max_examples == 20 and kit.profile().derandomize
    monkeypatch.setenv(kit.PROFILE_ENV, "thorough")
    assert kit.profile().max_examples == 300 and not kit.profile().derandomize
    monkeypatch.setenv(kit.PROFILE_ENV, "fast")
    with pytest.raises(ConfigError, match="KVPOLICY_HYPOTHESIS_PROFILE='fast': allowed: ci, thorough"):
        kit.profile()


def test_pytest_plugin_fixture(kvpolicy_invariants):
    assert kvpolicy_invariants is kit


def test_component_config_uses_a_companion_preset_when_one_exists():
    cfg = kit.component_config("merger", "pivotal")
    assert cfg["selector"] == {"name": "lookm-topk"} and cfg["merger"] == {"name": "pivotal"}
    cfg = kit.component_config("scorer", "knorm", {}, base={})
    assert cfg["scorer"] == {"name": "knorm"} and cfg["selector"] == {"name": "topk"}
    with pytest.raises(ConfigError, match="unknown component kind 'scorers'"):
        kit.component_config("scorers", "knorm")


def test_window_scorers_with_windows_shorter_than_the_kit_cases():
    """The presets' 32-query windows cover the kit's short sequences; a small window exercises the pooling
    (today's SnapKV pooled pads with the first valid entries, which this check caught)."""
    kit.check_policy({"budget": {"ratio": 0.5, "sink": 0}, "scorer": {"name": "snapkv", "window": 4, "kernel": 5}},
                     model=False)
    kit.check_policy({"budget": {"ratio": 0.5, "sink": 0}, "layers": {"name": "pyramid", "window": 2},
                      "scorer": {"name": "snapkv", "window": 3, "kernel": 3, "pooling": "max"}}, model=False)


@pytest.mark.parametrize("merger", ["averaged", "pivotal", "elastic-bucket"])
def test_convex_mergers_pass_after_a_scorer_that_reads_the_values(broken, merger):
    """The convex check reruns the merger alone on other values with the same selection: a value-reading
    scorer used to move filler slots between the two runs and fail correct mergers."""
    kit.check_policy({"budget": {"ratio": 0.5, "sink": 1, "recent": 0.25}, "scorer": "test-value-norm",
                      "selector": "lookm-topk", "merger": merger}, model=False,
                     hypothesis_settings=settings(kit.profile("ci"), max_examples=60))


_LAYOUTS = ("contiguous", "seq-major", "sliced-seq", "sliced-dim", "dim-major", "expanded-batch")


def _laid_out(layout: str, b: int, h: int, s: int, d: int, dtype: torch.dtype) -> torch.Tensor:
    """``[b, h, s, d]`` in one of the memory layouts a cache or a serving engine hands to ``gather_seq``."""
    if layout == "seq-major":  # an engine's step tensor [S, H, D] per batch row, transposed
        return torch.randn(b, s, h, d).to(dtype).transpose(1, 2)
    if layout == "sliced-seq":
        return torch.randn(b, h, s + 7, d).to(dtype)[:, :, 3: 3 + s]
    if layout == "sliced-dim":
        return torch.randn(b, h, s, d + 5).to(dtype)[..., :d]
    if layout == "dim-major":  # D strided: the fallback gather
        return torch.randn(b, h, d, s).to(dtype).transpose(-1, -2)
    if layout == "expanded-batch":
        return torch.randn(1, h, s, d).to(dtype).expand(b, h, s, d)
    return torch.randn(b, h, s, d).to(dtype)


@settings(kit.profile("ci"))
@given(b=st.integers(1, 3), h=st.integers(1, 4), s=st.integers(1, 40), d=st.integers(1, 9), k=st.integers(0, 20),
       layout=st.sampled_from(_LAYOUTS), shared=st.booleans(), half=st.booleans(), seed=st.integers(0, 2**16))
def test_gather_seq_equals_an_element_gather_in_every_layout(b, h, s, d, k, layout, shared, half, seed):
    from kvpolicy import ops

    torch.manual_seed(seed)
    x = _laid_out(layout, b, h, s, d, torch.bfloat16 if half else torch.float32)
    idx = torch.randint(0, s, (b, 1 if shared else h, k))
    want = x.gather(2, ops.expand_heads(idx, h).unsqueeze(-1).expand(b, h, k, d))
    assert torch.equal(ops.gather_seq(x, idx), want)
    with pytest.raises((IndexError, RuntimeError), match=r"outside \[0, |out of bounds"):
        ops.gather_seq(x, torch.full((b, h, 1), s))  # one past the end: refused, never read from a neighbour row
