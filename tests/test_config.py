"""Policy configuration: every bad input of issue 3 with its message, file round trips, per-layer overrides,
``policy -> config -> policy`` compressing identically, ``kvpolicy validate`` and ``kvpolicy schema``."""

from __future__ import annotations

import json
import tomllib

import pytest
import torch

import kvpolicy
from kvpolicy.cli import main
from kvpolicy.config import LayeredPolicy, dump_policy, dumps_policy, load_config, load_policy, policy_schema
from kvpolicy.errors import BudgetError, ConfigError, UnknownComponentError
from kvpolicy.registry import get_registry

from conftest import make_tiny_llama

GOOD_YAML = """\
name: my-text-prior
budget: {ratio: 0.25, sink: 2, recent: 0.5}
scorer: {name: snapkv, window: 8, kernel: 3}
prior: text-prior
selector: topk
merger: {name: pivotal}
decode: {name: rolling, every: 4}
layers: {schedule: pyramid, beta: 10, window: 4}
layer_overrides:
  0: {budget: {ratio: 0.5}}
  -1: {scorer: knorm, merger: none, prior: null}
"""


def write(tmp_path, name: str, text: str):
    p = tmp_path / name
    p.write_text(text)
    return p


# --------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("cfg, pattern", [
    ({"budget": 0.2, "scorer": "snapvk"},
     r"config: scorer: unknown scorer 'snapvk' - did you mean 'snapkv'\?; allowed: .*knorm"),
    ({"budget": 0.2, "scorer": {"name": "snapkv", "window": "wide"}},
     r"scorer\.window: Input should be a valid integer.*\(got 'wide'\).*\[scorer 'snapkv' takes: window: int, "
     r"kernel: int, pooling: Literal\['avg', 'max'\]\]"),
    ({"budget": 0.2, "scorer": {"name": "knorm", "windw": 3}},
     r"scorer\.windw: unknown field \(got 3\).*\[scorer 'knorm' takes: no parameters\]"),
    ({"budget": 0.2, "scorer": "knorm", "merge": "none"},
     r"merge: unknown field; allowed: name, description, budget, scorer, prior, selector, merger, decode, "
     r"layers, layer_overrides \(got 'none'\)"),
    ({"budget": {"ratio": 0.2, "sinks": 4}, "scorer": "knorm"},
     r"budget\.sinks: unknown field; allowed: ratio, tokens, sink, recent \(got 4\)"),
    ({"budget": {"ratio": 1.5}, "scorer": "knorm"}, r"budget\.ratio: Input should be less than or equal to 1 \(got 1\.5\)"),
    ({"budget": {"tokens": 16, "recent": 20}, "scorer": "knorm"},
     r"budget\.recent=20 tokens is larger than the budget of 16 tokens; allowed: 0 <= recent <= tokens"),
    ({"budget": {"ratio": 0.2, "tokens": 8}, "scorer": "knorm"},
     r"give exactly one of budget\.ratio \(a share in \(0, 1\]\) or budget\.tokens"),
    ({"scorer": "knorm"}, r"budget: field required"),
    (["budget", 0.2], r"cannot build a policy from list; allowed: a preset name, a path to a YAML/JSON/TOML file, "
                      r"a mapping"),
    ({"budget": 0.2, "scorer": "knorm", "layer_overrides": {0: {"decode": "none"}}},
     r"layer_overrides\.0\.decode: unknown field; allowed: budget, scorer, prior, selector, merger"),
    ({"budget": 0.2, "scorer": "knorm", "layer_overrides": {1: {"budget": {"ratio": 2}}}},
     r"layer_overrides\.1\.budget\.ratio: Input should be less than or equal to 1 \(got 2\)"),
    ({"budget": 0.2, "scorer": "knorm", "layer_overrides": {1: {"merger": "avg"}}},
     r"layer_overrides\.1\.merger: unknown merger 'avg'"),
])
def test_bad_configs_raise_config_error_with_path_value_and_allowed(cfg, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_policy(cfg)


def test_unknown_name_is_an_unknown_component_error():
    with pytest.raises(UnknownComponentError):
        load_policy({"budget": 0.2, "scorer": "nope"})


def test_ratio_override_out_of_range():
    with pytest.raises(ConfigError, match=r"budget\.ratio: Input should be less than or equal to 1 \(got 1\.5\)"):
        load_policy("snapkv", budget=1.5)
    with pytest.raises(ConfigError, match=r"budget=True: give a ratio in \(0, 1\]"):
        load_policy("snapkv", budget=True)
    with pytest.raises(ConfigError, match=r"unknown override 'budjet'; allowed: name, description, budget"):
        load_policy("snapkv", budjet=0.2)


def test_recent_window_larger_than_the_runtime_budget(tiny_llama):
    policy = load_policy({"budget": {"ratio": 0.1, "recent": 8, "sink": 0}, "scorer": "knorm"})
    with pytest.raises(BudgetError, match=r"recent window of 8 tokens is larger than the budget of 4 entries"):
        policy.layer_budget(0, 2, torch.tensor([40]))


def test_yaml_that_is_not_a_mapping(tmp_path):
    p = write(tmp_path, "list.yaml", "- snapkv\n- 0.2\n")
    with pytest.raises(ConfigError, match=r"list\.yaml: a policy config must be a mapping at the top level, got list"):
        load_policy(p)
    p = write(tmp_path, "broken.yaml", "budget: {ratio: 0.2\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: cannot parse YAML"):
        load_policy(str(p))


def test_yaml_safe_loader_only(tmp_path):
    p = write(tmp_path, "evil.yaml", "budget: !!python/object/apply:os.system ['true']\nscorer: knorm\n")
    with pytest.raises(ConfigError, match="cannot parse YAML"):
        load_policy(p)


def test_file_that_does_not_exist(tmp_path):
    with pytest.raises(ConfigError, match=r"missing\.yaml: no such config file"):
        load_policy(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match=r"unsupported config file type '\.ini'; allowed: \.yaml, \.yml, \.json, \.toml"):
        load_policy(tmp_path / "policy.ini")
    with pytest.raises(UnknownComponentError, match=r"unknown preset 'my-policy'.*or give a path to a "
                                                    r"\.yaml/\.json/\.toml file"):
        load_policy("my-policy")


# --------------------------------------------------------------------------------------------- files
def test_yaml_file_with_shorthands_and_overrides(tmp_path):
    policy = load_policy(write(tmp_path, "p.yaml", GOOD_YAML))
    assert isinstance(policy, LayeredPolicy)
    assert policy.budget == kvpolicy.Budget(ratio=0.25, sink=2, recent=0.5)
    assert (policy.scorer.window, policy.scorer.kernel) == (8, 3)
    assert (policy.prior.name, policy.selector.name, policy.decode.every) == ("text-prior", "topk", 4)
    assert (policy.schedule.name, policy.schedule.beta) == ("pyramid", 10.0)
    assert policy.overrides[0].budget == kvpolicy.Budget(ratio=0.5, sink=2, recent=0.5)
    assert policy.overrides[-1].scorer.name == "knorm" and policy.overrides[-1].no_prior
    bare = load_policy({"budget": 512, "scorer": "knorm"})
    assert bare.budget.tokens == 512 and bare.budget.ratio is None


@pytest.mark.parametrize("suffix", [".yaml", ".json", ".toml"])
@pytest.mark.parametrize("preset", ["snapkv", "lookm-pivot", "pyramidkv", "h2o-rolling"])
def test_file_round_trips(tmp_path, suffix, preset):
    policy = load_policy(preset, budget={"ratio": 0.3, "recent": 4})
    path = dump_policy(policy, tmp_path / f"policy{suffix}")
    again = load_policy(path)
    assert again.to_config() == policy.to_config()
    assert again == policy


@pytest.mark.parametrize("fmt", ["yaml", "json"])
def test_layer_overrides_round_trip(tmp_path, fmt):
    policy = load_policy(write(tmp_path, "p.yaml", GOOD_YAML))
    again = load_policy(write(tmp_path, f"again.{fmt}", dumps_policy(policy, fmt)))
    assert again.to_config() == policy.to_config()
    with pytest.raises(ConfigError, match=r"TOML cannot hold null values \(policy 'my-text-prior' has null at "
                                          r"layer_overrides\.-1\.prior\); allowed: dump this policy as YAML or JSON"):
        dumps_policy(policy, "toml")


@pytest.mark.parametrize("suffix", [".yaml", ".json", ".toml"])
@pytest.mark.parametrize("preset", get_registry().names("preset"))
def test_every_preset_round_trips_through_every_file_format(tmp_path, suffix, preset):
    policy = load_policy(preset)
    again = load_policy(dump_policy(policy, tmp_path / f"{preset}{suffix}"))
    assert again.to_config() == policy.to_config()


def test_toml_leaves_out_parameters_that_are_null_by_default():
    policy = load_policy("kvzip-lite-mass")  # scorer.tokens and merger.quantile are None by default
    cfg = policy.to_config()
    assert cfg["scorer"]["tokens"] is None and cfg["merger"]["quantile"] is None
    data = tomllib.loads(dumps_policy(policy, "toml"))
    assert "tokens" not in data["scorer"] and "quantile" not in data["merger"]
    assert load_policy(data).to_config() == cfg


def test_toml_round_trip_with_layer_overrides(tmp_path):
    policy = load_policy({"budget": 0.3, "scorer": "knorm", "layer_overrides": {1: {"scorer": "streaming"}}})
    again = load_policy(write(tmp_path, "p.toml", dumps_policy(policy, "toml")))
    assert again.to_config() == policy.to_config()


def _compress_tiny(model, policy, ids):
    with torch.inference_mode(), kvpolicy.compress(model, policy) as cache:
        model(input_ids=ids, cache=cache, use_cache=True)
    return [(layer.positions.clone(), layer.valid.clone(), layer.keys.clone(), layer.values.clone())
            for layer in cache.layers]


@pytest.mark.parametrize("spec", ["snapkv", "lookm-pivot", "pyramidkv", "random", "GOOD_YAML"])
def test_policy_to_config_to_policy_compresses_identically(tmp_path, spec):
    model = make_tiny_llama(layers=3)
    ids = torch.randint(3, 128, (2, 48), generator=torch.Generator().manual_seed(0))
    policy = load_policy(write(tmp_path, "p.yaml", GOOD_YAML)) if spec == "GOOD_YAML" else load_policy(spec)
    rebuilt = load_policy(load_config(policy.to_config()))
    a, b = _compress_tiny(model, policy, ids), _compress_tiny(model, rebuilt, ids)
    assert a[0][0].shape[-1] < 48  # something was compressed
    for (pa, va, ka, xa), (pb, vb, kb, xb) in zip(a, b):
        assert torch.equal(pa, pb) and torch.equal(va, vb) and torch.equal(ka, kb) and torch.equal(xa, xb)


# --------------------------------------------------------------------------------------------- per layer
def test_layer_overrides_change_only_their_layers():
    model = make_tiny_llama(layers=3)
    ids = torch.randint(3, 128, (1, 60), generator=torch.Generator().manual_seed(2))
    base = {"budget": {"ratio": 0.2, "sink": 2}, "scorer": "accumulated-attention"}
    plain = _compress_tiny(model, load_policy(base), ids)
    layered = _compress_tiny(model, load_policy({**base, "layer_overrides": {
        0: {"budget": {"ratio": 0.5}}, -1: {"scorer": "streaming"}}}), ids)
    streaming_last = _compress_tiny(model, load_policy({**base, "scorer": "streaming"}), ids)
    assert plain[0][1][:, 0].sum() == 12 and layered[0][1][:, 0].sum() == 30  # layer 0 keeps half
    assert torch.equal(layered[1][0], plain[1][0])  # layer 1 is untouched by the overrides
    assert torch.equal(layered[2][0], streaming_last[2][0])  # the last layer uses the streaming scorer
    assert not torch.equal(layered[2][0], plain[2][0])


def test_layer_override_index_out_of_range_fails_before_compressing(tiny_llama):
    policy = load_policy({"budget": 0.2, "scorer": "knorm", "layer_overrides": {5: {"scorer": "streaming"}}})
    ids = torch.randint(3, 100, (1, 30))
    with kvpolicy.compress(tiny_llama, policy) as cache:
        with pytest.raises(ConfigError, match=r"layer_overrides: layer 5 does not exist in a 2-layer model; "
                                              r"allowed: -2 \.\. 1"):
            tiny_llama(input_ids=ids, cache=cache)


# --------------------------------------------------------------------------------------------- CLI
def test_validate_ok_and_errors(tmp_path, capsys):
    good = write(tmp_path, "good.yaml", GOOD_YAML)
    assert main(["validate", str(good)]) == 0
    assert capsys.readouterr().out.strip() == f"ok: {good} -> policy 'my-text-prior'"
    bad = write(tmp_path, "bad.yaml", "budget: {ratio: 1.5, sinks: 2}\nscorer: {name: snapkv, window: wide}\n")
    assert main(["validate", str(bad)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"invalid: {bad}"
    assert f"  {bad}: budget.ratio: Input should be less than or equal to 1 (got 1.5)" in err
    assert "  budget.sinks: unknown field; allowed: ratio, tokens, sink, recent (got 2)" in err
    missing = tmp_path / "missing.toml"
    assert main(["validate", str(missing)]) == 1
    assert "no such config file" in capsys.readouterr().err
    notmap = write(tmp_path, "n.json", "[1, 2]")
    assert main(["validate", str(notmap)]) == 1
    assert "must be a mapping at the top level, got list" in capsys.readouterr().err


def test_schema_includes_every_registered_component_and_its_parameters(capsys):
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema == json.loads(json.dumps(policy_schema()))
    reg = get_registry()
    fields = {"scorer": "scorer", "prior": "prior", "selector": "selector", "merger": "merger", "decode": "decode",
              "schedule": "layers"}
    for (kind, name), item in reg.components.items():
        variants = {v.get("title"): v for v in schema["properties"][fields[kind]]["anyOf"]}
        sub = variants[f"{kind} {name}"]
        assert sub["properties"]["name"]["const"] == name
        assert set(sub["properties"]) == {"name", *item.obj.model_fields}
    snap = {v.get("title"): v for v in schema["properties"]["scorer"]["anyOf"]}["scorer snapkv"]
    assert snap["properties"]["window"]["type"] == "integer" and snap["properties"]["window"]["minimum"] == 1
    assert "layer_overrides" in schema["properties"]
    assert {"ratio", "tokens", "sink", "recent"} <= set(schema["$defs"]["Budget"]["properties"])
