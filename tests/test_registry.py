"""The plugin registry: entry points from real (temporary) distributions, conflicts, failures, disabling."""

from __future__ import annotations

import importlib
import sys
import textwrap
from pathlib import Path
from typing import ClassVar

import pytest
import torch

import kvpolicy
from kvpolicy import registry
from kvpolicy.cli import main
from kvpolicy.errors import PluginError, UnknownComponentError
from kvpolicy.policy import CompressionContext, Scorer


def make_dist(root: Path, dist: str, module: str, body: str, ep_name: str | None = None) -> None:
    """A minimal installed distribution on ``root``: ``<dist>.dist-info`` with an entry point + a module."""
    info = root / f"{dist.replace('-', '_')}-1.2.3.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text(f"[kvpolicy]\n{ep_name or module} = {module}\n")
    (root / f"{module}.py").write_text(textwrap.dedent(body))


SCORER_PLUGIN = """
    from typing import ClassVar
    import kvpolicy

    class Ones(kvpolicy.Scorer):
        '''every entry scores one'''
        name: ClassVar[str] = "{name}"

        def score(self, ctx):
            return ctx.valid.float()

    @kvpolicy.hookimpl
    def kvpolicy_components():
        return [Ones]
"""


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A temporary site directory on sys.path; distributions created in it are visible to entry_points()."""
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    importlib.invalidate_caches()
    for name in [m for m in sys.modules if m.startswith("kvp_test_")]:
        del sys.modules[name]


def test_entry_point_plugin_from_a_distribution_is_registered_with_its_distribution_and_version(site):
    make_dist(site, "kvp-test-ones", "kvp_test_ones", SCORER_PLUGIN.format(name="test-ones"))
    importlib.invalidate_caches()
    reg = registry.build_registry()
    hit = reg.components[("scorer", "test-ones")]
    assert (hit.plugin, hit.distribution, hit.version) == ("kvp_test_ones", "kvp-test-ones", "1.2.3")
    assert hit.description == "every entry scores one"
    assert ("scorer", "knorm") in reg.components  # the built-ins still load


def test_two_plugins_registering_the_same_name_is_an_error_naming_both_distributions(site):
    make_dist(site, "kvp-test-alpha", "kvp_test_alpha", SCORER_PLUGIN.format(name="dup-scorer"))
    make_dist(site, "kvp-test-beta", "kvp_test_beta", SCORER_PLUGIN.format(name="dup-scorer"))
    importlib.invalidate_caches()
    with pytest.raises(PluginError) as err:
        registry.build_registry()
    msg = str(err.value)
    assert "scorer 'dup-scorer' is registered twice" in msg
    assert "'kvp-test-alpha'" in msg and "'kvp-test-beta'" in msg


def test_conflict_with_a_builtin_names_kvpolicy_and_the_plugin(site):
    make_dist(site, "kvp-test-clash", "kvp_test_clash", SCORER_PLUGIN.format(name="knorm"))
    importlib.invalidate_caches()
    with pytest.raises(PluginError, match=r"scorer 'knorm' is registered twice.*'kvpolicy'.*'kvp-test-clash'"):
        registry.build_registry()


def test_failing_plugin_warns_with_distribution_and_error_and_others_load(site, monkeypatch):
    make_dist(site, "kvp-test-broken", "kvp_test_broken", "raise ImportError('needs libfoo 9')\n")
    make_dist(site, "kvp-test-ok", "kvp_test_ok", SCORER_PLUGIN.format(name="still-here"))
    importlib.invalidate_caches()
    monkeypatch.delenv("KVPOLICY_STRICT_PLUGINS", raising=False)
    with pytest.warns(RuntimeWarning, match=r"'kvp_test_broken' from distribution 'kvp-test-broken' failed to "
                                            r"load: ImportError\('needs libfoo 9'\)"):
        reg = registry.build_registry()
    assert "kvp_test_broken" in reg.failed
    assert ("scorer", "still-here") in reg.components and ("merger", "none") in reg.components
    with pytest.raises(PluginError, match=r"kvp-test-broken.*needs libfoo 9.*strict mode"):
        registry.build_registry(strict=True)
    monkeypatch.setenv("KVPOLICY_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match="needs libfoo 9"):
        registry.build_registry()


def test_hook_returning_junk_or_raising_is_a_load_failure(site):
    make_dist(site, "kvp-test-junk", "kvp_test_junk", """
        import kvpolicy

        @kvpolicy.hookimpl
        def kvpolicy_components():
            return ["not a class"]

        @kvpolicy.hookimpl
        def kvpolicy_presets():
            raise RuntimeError("preset table corrupt")
    """)
    importlib.invalidate_caches()
    with pytest.warns(RuntimeWarning) as rec:
        reg = registry.build_registry(strict=False)
    text = " | ".join(str(w.message) for w in rec)
    assert "returned 'not a class' from kvpolicy_components()" in text
    assert "raised in kvpolicy_presets(): RuntimeError('preset table corrupt')" in text
    assert "kvp-test-junk" in text and "snapkv" in reg.presets


def test_disable_by_environment_skips_the_plugin(monkeypatch):
    monkeypatch.setenv("KVPOLICY_DISABLE_PLUGINS", "lookm, kvmerger")
    reg = registry.build_registry()
    assert ("merger", "pivotal") not in reg.components and "lookm-pivot" not in reg.presets
    assert set(reg.disabled) >= {"lookm", "kvmerger"} and reg.disabled["lookm"].distribution == "kvpolicy"
    assert ("scorer", "snapkv") in reg.components


def test_config_naming_a_disabled_plugin_says_it_is_disabled():
    registry.disable_plugin("lookm")
    try:
        with pytest.raises(UnknownComponentError) as err:
            kvpolicy.load_policy({"budget": 0.2, "scorer": "accumulated-attention", "merger": "pivotal"})
        assert ("merger 'pivotal' is provided by plugin 'lookm' (distribution 'kvpolicy'), which is disabled"
                in str(err.value))
        assert "enable_plugin('lookm')" in str(err.value)
        with pytest.raises(UnknownComponentError, match="preset 'lookm-pivot' is provided by plugin 'lookm'.*disabled"):
            kvpolicy.load_policy("lookm-pivot")
    finally:
        registry.enable_plugin("lookm")
    assert kvpolicy.load_policy("lookm-pivot").merger.name == "pivotal"


class _Half(Scorer):
    """Scores the first half of the entries higher."""

    name: ClassVar[str] = "test-first-half"

    def score(self, ctx: CompressionContext) -> torch.Tensor:
        s = ctx.shape[2]
        return (torch.arange(s, device=ctx.keys.device) < s // 2).float().expand(*ctx.shape)


class _RuntimePlugin:
    @kvpolicy.hookimpl
    def kvpolicy_components(self) -> list[type]:
        return [_Half]


def test_register_plugin_at_run_time_and_conflicts():
    registry.register_plugin(_RuntimePlugin(), "test-runtime")
    try:
        reg = registry.get_registry()
        assert reg.components[("scorer", "test-first-half")].distribution == "(registered at run time)"
        policy = kvpolicy.load_policy({"budget": 0.5, "scorer": "test-first-half"})
        assert policy.scorer.name == "test-first-half"
        with pytest.raises(PluginError, match="already registered as 'test-runtime'"):
            registry.register_plugin(_RuntimePlugin(), "test-runtime")
        with pytest.raises(PluginError, match=r"scorer 'test-first-half' is registered twice"):
            registry.register_plugin(_RuntimePlugin(), "test-runtime-2")
        assert ("scorer", "test-first-half") in registry.get_registry().components  # the failed one was undone
    finally:
        registry.unregister_plugin("test-runtime")
    assert ("scorer", "test-first-half") not in registry.get_registry().components


def test_unknown_name_suggests_close_matches():
    reg = registry.get_registry()
    with pytest.raises(UnknownComponentError) as err:
        reg.component("scorer", "snapvk")
    assert "unknown scorer 'snapvk' - did you mean 'snapkv'?" in str(err.value)
    assert "allowed: " in str(err.value) and "knorm" in str(err.value)
    with pytest.raises(UnknownComponentError, match="unknown component kind 'scorers'; allowed: scorer, prior"):
        reg.component("scorers", "knorm")


def test_cli_plugins_lists_kind_name_distribution_version_description(capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    header, *rows = out.splitlines()
    assert header.split() == ["kind", "name", "distribution", "description"]
    knorm = next(r for r in rows if r.split()[:2] == ["scorer", "knorm"])
    assert "kvpolicy 0.1.0" in knorm and "KnormPress: keep the keys of smallest L2 norm." in knorm
    assert any(r.split()[:2] == ["preset", "snapkv"] for r in rows)
    assert main(["plugins", "--json"]) == 0
    import json

    data = json.loads(capsys.readouterr().out)
    assert {"kind": "merger", "name": "none", "distribution": "kvpolicy 0.1.0",
            "description": "Evict: keep the selected entries unchanged, drop the others."} in data
