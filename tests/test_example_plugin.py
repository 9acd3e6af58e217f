"""A real third-party package: examples/kvpolicy-example-plugin installed with pip, then used.

The package is installed with ``pip install --no-deps --no-build-isolation --target <tmp>`` (no network)
and its target directory is put on ``sys.path`` for this test session only, so concurrent test runs in
the same environment do not see it; at the end it is removed and the registry reloaded.
"""

from __future__ import annotations

import importlib
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kvpolicy
from kvpolicy import registry
from kvpolicy.cli import main

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "kvpolicy-example-plugin"


@pytest.fixture(scope="module")
def example_plugin(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    build = tmp_path_factory.mktemp("build")
    src = build / "src"
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                           "--disable-pip-version-check", "--quiet", "--target", str(target), str(src)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert list(target.glob("kvpolicy_example_plugin-0.1.0.dist-info"))
    sys.path.insert(0, str(target))
    importlib.invalidate_caches()
    registry.reload()
    assert ("scorer", "value-norm") in registry.get_registry().components
    yield target
    sys.path.remove(str(target))
    for name in [m for m in sys.modules if m.startswith("kvpolicy_example_plugin")]:
        del sys.modules[name]
    importlib.invalidate_caches()
    registry.reload()
    assert ("scorer", "value-norm") not in registry.get_registry().components  # other tests are unaffected


def test_installed_plugin_is_listed_by_kvpolicy_plugins(example_plugin, capsys):
    assert main(["plugins"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [r.split(None, 5) for r in lines[1:]]
    by_name = {(r[0], r[1]): r for r in rows}
    scorer = by_name[("scorer", "value-norm")]
    assert scorer[2:5] == ["example", "kvpolicy-example-plugin", "0.1.0"]  # plugin = the entry-point name
    line = next(x for x in lines if x.split()[:2] == ["scorer", "value-norm"])
    assert line[lines[0].index("paper"):].startswith("VATP, Guo et al., EMNLP 2024, arXiv:2406.12335")
    assert line[lines[0].index("description"):].startswith("VATP: attention received times the value's p-norm")
    assert by_name[("preset", "vatp")][2:5] == ["example", "kvpolicy-example-plugin", "0.1.0"]
    hit = registry.get_registry().components[("scorer", "value-norm")]
    assert hit.plugin == "example"


def test_a_yaml_config_can_use_the_plugin(example_plugin, tmp_path, capsys):
    cfg = tmp_path / "vatp.yaml"
    cfg.write_text("name: vatp-window\nbudget: {ratio: 0.25, sink: 4}\nscorer: {name: value-norm, window: 16, p: 2}\n")
    assert main(["validate", str(cfg)]) == 0
    policy = kvpolicy.load_policy(cfg)
    assert (policy.scorer.name, policy.scorer.window, policy.scorer.p) == ("value-norm", 16, 2)
    bad = tmp_path / "bad.yaml"
    bad.write_text("budget: 0.2\nscorer: {name: value-norm, p: 3}\n")
    assert main(["validate", str(bad)]) == 1
    assert "scorer.p: Input should be 1 or 2 (got 3)" in capsys.readouterr().err
    assert main(["schema"]) == 0
    assert '"title": "scorer value-norm"' in capsys.readouterr().out


def test_value_norm_scores_attention_times_value_norm(example_plugin):
    from kvpolicy_example_plugin import ValueNorm

    from kvpolicy import testing as kit

    case = kit.Case(batch=1, kv_heads=2, group=2, seq=6, head_dim=4, dtype=torch.float32, pads=(0,),
                    pattern="random", image_share=0.0, budget={"tokens": 3}, layer_idx=0, n_layers=1, seed=3)
    policy = kvpolicy.load_policy("vatp")
    inputs = kit.make_inputs(case)
    ctx = kit.make_context(policy, case, inputs)
    got = ValueNorm(p=1).score(ctx)
    want = ctx.accumulated_attention() * inputs.values.abs().sum(-1)
    torch.testing.assert_close(got, want)
    zeroed = kit.make_inputs(case)
    zeroed.values[:, :, 2] = 0.0  # an entry with a zero value scores zero whatever its attention
    assert bool((ValueNorm().score(kit.make_context(policy, case, zeroed))[:, :, 2] == 0).all())


def test_plugin_compresses_smollm2_in_generate_from_a_yaml_config(example_plugin, smollm2, tmp_path):
    model, tok = smollm2
    text = ("The lighthouse keeper wrote the code 7481 in the log. " * 2 +
            "Ships passed in the fog and the keeper counted them one by one. " * 6)
    ids = tok(text, return_tensors="pt")
    n = ids["input_ids"].shape[1]
    cfg = tmp_path / "vatp.yaml"
    cfg.write_text("name: vatp-yaml\nbudget: {ratio: 0.3, sink: 4, recent: 0.25}\nscorer: value-norm\n")
    with torch.inference_mode(), kvpolicy.compress(model, cfg) as cache:
        out = model.generate(**ids, cache=cache, max_new_tokens=3, do_sample=False, pad_token_id=tok.eos_token_id)
    assert out.shape[1] == n + 3
    report = cache.report()
    assert report.policy == "vatp-yaml" and len(report.layers) == 30
    for row in report.layers:
        assert row.tokens_seen == n + 2
        assert row.tokens_kept == int(n * 0.3) + 2  # compressed at prefill, then one entry per new token
    assert report.bytes_now < 0.5 * report.bytes_full


def test_the_example_packages_own_tests_pass(example_plugin):
    spec = importlib.util.spec_from_file_location("example_plugin_tests", EXAMPLE / "tests" / "test_plugin.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    tests = [getattr(mod, n) for n in dir(mod) if n.startswith("test_")]
    assert len(tests) == 3
    for test in tests:
        test()
