"""The engine-free half of serving (kvpolicy.serving): what an engine can run, and that it runs the same."""

from __future__ import annotations

import pytest
import torch

from kvpolicy.errors import ConfigError
from kvpolicy.policy import CompressionContext
from kvpolicy.serving import ServeConfig, ServingContext, check_servable, parse_serve_config

LAYERS = 6


def _servable(spec, budget=0.2):  # noqa: ANN001, ANN202
    return check_servable(parse_serve_config({"policy": spec, "budget": budget}, "test"), LAYERS)


@pytest.mark.parametrize(("preset", "window"), [("streaming", 0), ("snapkv", 32), ("tova", 1), ("knorm", 0),
                                                 ("random", 0)])
def test_servable_presets_and_their_query_window(preset: str, window: int) -> None:
    s = _servable(preset)
    assert s.query_window == window
    assert s.kept(1000) == 200


@pytest.mark.parametrize(("preset", "why"), [
    ("h2o", "accumulated attention of every prompt query"),
    ("pyramidkv", "different budgets"),
    ("h2o-rolling", "accumulated attention|decode rule 'rolling'"),
    ("kvzip", "context-reconstruction|reconstruction"),
    ("kvmerger", "accumulated attention"),
    ("adakv-snapkv", "different counts per KV head"),
    ("snapkv-global", "pools every layer"),
])
def test_what_an_engine_cannot_give_is_refused_naming_what_runs(preset: str, why: str) -> None:
    with pytest.raises(ConfigError, match=why) as err:
        _servable(preset)
    assert "snapkv" in str(err.value) or "uniform" in str(err.value)


def test_a_decode_rule_is_refused() -> None:
    with pytest.raises(ConfigError, match="decode rule 'rolling'.*use decode 'none'"):
        check_servable(parse_serve_config({"policy": {"scorer": "knorm", "decode": "rolling", "budget": 0.2}}, "t"),
                       LAYERS)


def _layer(n: int, hkv: int = 2, group: int = 3, d: int = 16, seed: int = 0):  # noqa: ANN202
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(hkv, n, d, generator=g), torch.randn(hkv, n, d, generator=g),
            torch.randn(hkv * group, n, d, generator=g))


@pytest.mark.parametrize("preset", ["snapkv", "tova", "knorm", "streaming"])
def test_the_last_queries_suffice(preset: str) -> None:
    """What an engine gives (the last ``query_window`` queries) keeps what the whole prefill keeps."""
    s = _servable(preset)
    n = 300
    keys, values, queries = _layer(n)
    w = max(s.query_window, 1)
    kk, vv = s.compress(2, keys, values, queries[:, -w:], torch.arange(n - w, n), 0.25)
    budget = s.policy.layer_budgets(LAYERS, torch.tensor([n]))[2]
    ctx = CompressionContext(layer_idx=2, n_layers=LAYERS, phase="prefill", keys=keys[None], values=values[None],
                             positions=torch.arange(n).expand(1, 2, n), valid=torch.ones(1, 2, n, dtype=torch.bool),
                             is_image=torch.zeros(1, 2, n, dtype=torch.bool), budget=budget, scaling=0.25,
                             queries=queries[None], query_pos=torch.arange(n)[None])
    _, merged = s.policy.compress(ctx)
    assert kk.shape == (2, 60, 16)
    assert torch.equal(kk, merged.keys[0]) and torch.equal(vv, merged.values[0])


def test_fewer_queries_than_the_window_are_refused_not_approximated() -> None:
    s = _servable("snapkv")
    keys, values, queries = _layer(300)
    with pytest.raises(ConfigError, match="last 32 queries needs 32 queries; the serving engine kept 8"):
        s.compress(0, keys, values, queries[:, -8:], torch.arange(292, 300), 0.25)
    assert issubclass(ServingContext, CompressionContext)


def test_settings_forms_and_errors() -> None:
    assert parse_serve_config("off", "x").enabled is False
    assert parse_serve_config(False, "x").enabled is False
    assert parse_serve_config("knorm", "x").policy == "knorm"
    assert parse_serve_config('{"policy": "tova", "budget": 64}', "x").budget == 64
    assert parse_serve_config({"policy": "snapkv"}, "x").key() == ServeConfig(policy="snapkv").key()
    with pytest.raises(ConfigError, match=r"additional_config: \.budget: a ratio must be in \(0, 1\]"):
        parse_serve_config({"budget": 1.5}, "additional_config")
    with pytest.raises(ConfigError, match="unknown field.*allowed: policy, budget, enabled"):
        parse_serve_config({"polcy": "snapkv"}, "extra_args")
    with pytest.raises(ConfigError, match="not valid JSON"):
        parse_serve_config("{policy: snapkv}", "x")
    with pytest.raises(ConfigError, match="unknown preset 'snapk'"):
        check_servable(parse_serve_config({"policy": "snapk"}, "x"), LAYERS)


def test_a_merger_with_a_logit_bias_is_refused() -> None:
    """The dry run sees the mass-preserving merger's log-multiplicity bias, which vLLM's attention cannot apply."""
    with pytest.raises(ConfigError, match="merger 'mass' returns a logit bias"):
        check_servable(parse_serve_config({"policy": {"scorer": "knorm", "merger": {"name": "mass", "weights": "count"},
                                                          "budget": 0.2}}, "t"),
                       LAYERS)


def test_each_layer_is_traced_like_the_transformers_cache(monkeypatch) -> None:  # noqa: ANN001
    from kvpolicy import tracing

    seen = []
    real = tracing.compress_span

    def spy(ev):  # noqa: ANN001, ANN202
        seen.append(ev)
        return real(ev)

    monkeypatch.setattr(tracing, "compress_span", spy)
    s = _servable("snapkv")
    keys, values, queries = _layer(300)
    s.compress(4, keys, values, queries[:, -32:], torch.arange(268, 300), 0.25)
    (ev,) = seen
    assert (ev.layer, ev.policy, ev.tokens_in, ev.tokens_kept, ev.tokens_dropped) == (4, "snapkv", 300, 60, 240)
    assert ev.bytes_after * 5 == ev.bytes_before and ev.seconds > 0


def test_log_level_from_the_environment(monkeypatch, capsys) -> None:  # noqa: ANN001
    import logging

    import kvpolicy_vllm

    lg = logging.getLogger("kvpolicy")
    before = (lg.level, list(lg.handlers))
    try:
        monkeypatch.setenv("KVPOLICY_LOG_LEVEL", "debug")
        kvpolicy_vllm._log_from_env()
        kvpolicy_vllm._log_from_env()  # once more (each vLLM process may load the plugin twice): one handler
        assert lg.level == logging.DEBUG and sum(getattr(h, "_kvpolicy", False) for h in lg.handlers) == 1
        logging.getLogger("kvpolicy.vllm").debug("request r1 compressed")
        assert "DEBUG kvpolicy [pid" in capsys.readouterr().err
        monkeypatch.setenv("KVPOLICY_LOG_LEVEL", "loud")
        with pytest.raises(ValueError, match="KVPOLICY_LOG_LEVEL='loud': use DEBUG, INFO"):
            kvpolicy_vllm._log_from_env()
    finally:
        lg.setLevel(before[0])
        lg.handlers[:] = before[1]
