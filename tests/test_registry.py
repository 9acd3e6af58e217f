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
        with pytest.warns(RuntimeWarning, match=r"'test-runtime-2' .* refused: scorer 'test-first-half' is "
                                                r"already registered by plugin 'test-runtime'"):
            registry.register_plugin(_RuntimePlugin(), "test-runtime-2")
        hit = registry.get_registry().components[("scorer", "test-first-half")]
        assert hit.plugin == "test-runtime" and "test-runtime-2" in registry.get_registry().failed
    finally:
        registry.unregister_plugin("test-runtime-2")
        registry.unregister_plugin("test-runtime")
    assert ("scorer", "test-first-half") not in registry.get_registry().components


TWO_SCORERS_PLUGIN = """
    from typing import ClassVar
    import kvpolicy

    class Ones(kvpolicy.Scorer):
        '''every entry scores one'''
        name: ClassVar[str] = "{clash}"

        def score(self, ctx):
            return ctx.valid.float()

    class Mine(Ones):
        '''a name nobody else has'''
        name: ClassVar[str] = "{own}"

    @kvpolicy.hookimpl
    def kvpolicy_components():
        return [Ones, Mine]

    @kvpolicy.hookimpl
    def kvpolicy_presets():
        return [kvpolicy.Preset("{own}-preset", {{"budget": 0.2, "scorer": "{own}"}})]
"""


def _refusal(rec: pytest.WarningsRecorder) -> str:
    msgs = [str(w.message) for w in rec if "refused" in str(w.message)]
    assert len(msgs) == 1, msgs
    return msgs[0]


def test_two_plugins_registering_the_same_name_the_first_by_entry_point_name_wins(site, monkeypatch):
    monkeypatch.delenv("KVPOLICY_STRICT_PLUGINS", raising=False)
    make_dist(site, "kvp-test-beta", "kvp_test_beta", TWO_SCORERS_PLUGIN.format(clash="dup-scorer", own="beta-own"))
    make_dist(site, "kvp-test-alpha", "kvp_test_alpha", SCORER_PLUGIN.format(name="dup-scorer"))
    importlib.invalidate_caches()
    with pytest.warns(RuntimeWarning) as rec:
        reg = registry.build_registry()
    msg = _refusal(rec)
    assert msg.startswith("kvpolicy plugin 'kvp_test_beta' from distribution 'kvp-test-beta' refused: scorer "
                          "'dup-scorer' is already registered by plugin 'kvp_test_alpha' (distribution "
                          "'kvp-test-alpha'); none of its components or presets are registered")
    assert reg.components[("scorer", "dup-scorer")].plugin == "kvp_test_alpha"
    # the whole contribution of the refused plugin is dropped, and it is listed as failed
    assert ("scorer", "beta-own") not in reg.components and "beta-own-preset" not in reg.presets
    assert reg.failed == {"kvp_test_beta": msg} and "kvp_test_beta" not in reg.plugins
    assert ("scorer", "knorm") in reg.components and "snapkv" in reg.presets
    with pytest.raises(PluginError, match=r"'kvp_test_beta' from distribution 'kvp-test-beta' refused: .*"
                                          r"'kvp_test_alpha' \(distribution 'kvp-test-alpha'\).*strict mode"):
        registry.build_registry(strict=True)


def test_conflict_with_a_builtin_the_builtin_wins_and_the_rest_keeps_working(site, monkeypatch, capsys):
    monkeypatch.delenv("KVPOLICY_STRICT_PLUGINS", raising=False)
    # "aaa_clash" sorts before every built-in entry point: the built-ins still win
    make_dist(site, "kvp-test-clash", "kvp_test_clash", TWO_SCORERS_PLUGIN.format(clash="knorm", own="clash-own"),
              ep_name="aaa_clash")
    make_dist(site, "kvp-test-ok", "kvp_test_ok", SCORER_PLUGIN.format(name="still-here"))
    importlib.invalidate_caches()
    try:
        with pytest.warns(RuntimeWarning) as rec:
            reg = registry.reload()
        msg = _refusal(rec)
        assert ("'aaa_clash' from distribution 'kvp-test-clash' refused: scorer 'knorm' is already registered by "
                "plugin 'baselines' (distribution 'kvpolicy')") in msg
        assert reg.components[("scorer", "knorm")].plugin == "baselines"
        assert ("scorer", "clash-own") not in reg.components and ("scorer", "still-here") in reg.components
        assert kvpolicy.load_policy("h2o").scorer.name == "accumulated-attention"
        assert main(["plugins"]) == 0
        out = capsys.readouterr().out.splitlines()
        assert any(r.split()[:3] == ["scorer", "knorm", "baselines"] for r in out)
        assert f"FAILED aaa_clash: {msg}" in out
        with pytest.raises(PluginError, match="'aaa_clash' from distribution 'kvp-test-clash' refused"):
            registry.build_registry(strict=True)
    finally:
        monkeypatch.undo()  # the temporary distributions leave sys.path before the process-wide reload
        importlib.invalidate_caches()
        registry.reload()
    assert "aaa_clash" not in registry.get_registry().failed


def test_two_entry_points_with_the_same_name_the_builtin_or_the_first_wins(site, monkeypatch):
    monkeypatch.delenv("KVPOLICY_STRICT_PLUGINS", raising=False)
    make_dist(site, "kvp-test-twin-a", "kvp_test_twin_a", SCORER_PLUGIN.format(name="twin-a"), ep_name="twin")
    make_dist(site, "kvp-test-twin-b", "kvp_test_twin_b", SCORER_PLUGIN.format(name="twin-b"), ep_name="twin")
    make_dist(site, "kvp-test-fake", "kvp_test_fake", SCORER_PLUGIN.format(name="fake-lookm"), ep_name="lookm")
    importlib.invalidate_caches()
    with pytest.warns(RuntimeWarning) as rec:
        reg = registry.build_registry()
    text = " | ".join(str(w.message) for w in rec)
    assert ("'lookm' from distribution 'kvp-test-fake' refused: another kvpolicy plugin named 'lookm' "
            "(distribution 'kvpolicy') is already loaded") in text
    assert reg.plugins["lookm"][0] == "kvpolicy" and ("merger", "pivotal") in reg.components
    assert ("scorer", "fake-lookm") not in reg.components
    (winner,) = [n for n in ("twin-a", "twin-b") if ("scorer", n) in reg.components]  # exactly one of the twins
    loser = "twin-b" if winner == "twin-a" else "twin-a"
    assert reg.plugins["twin"][0] == f"kvp-test-{winner}"
    assert (f"'twin' from distribution 'kvp-test-{loser}' refused: another kvpolicy plugin named 'twin' "
            f"(distribution 'kvp-test-{winner}') is already loaded") in text
    with pytest.raises(PluginError, match="another kvpolicy plugin named"):
        registry.build_registry(strict=True)


class _Clashing:
    """A run-time plugin whose preset ``h2o`` clashes with the built-in, with a scorer of its own."""

    @kvpolicy.hookimpl
    def kvpolicy_components(self) -> list[type]:
        return [_Half]

    @kvpolicy.hookimpl
    def kvpolicy_presets(self) -> list[registry.Preset]:
        return [registry.Preset("h2o", {"budget": 0.9, "scorer": "test-first-half"}, "not H2O")]


def test_run_time_plugin_clashing_with_a_builtin_preset_is_refused(monkeypatch):
    monkeypatch.delenv("KVPOLICY_STRICT_PLUGINS", raising=False)
    with pytest.warns(RuntimeWarning, match=r"kvpolicy plugin 'test-clash' from distribution '\(registered at run "
                                            r"time\)' refused: preset 'h2o' is already registered by plugin "
                                            r"'baselines' \(distribution 'kvpolicy'\)"):
        registry.register_plugin(_Clashing(), "test-clash")
    try:
        reg = registry.get_registry()
        assert "test-clash" in reg.failed and "test-clash" not in reg.plugins
        assert ("scorer", "test-first-half") not in reg.components  # its whole contribution is dropped
        h2o = kvpolicy.load_policy("h2o")
        assert (h2o.scorer.name, h2o.budget.ratio) == ("accumulated-attention", 0.2)  # the built-in
    finally:
        registry.unregister_plugin("test-clash")
    assert "test-clash" not in registry.get_registry().failed
    monkeypatch.setenv("KVPOLICY_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match="'test-clash' .* refused: preset 'h2o'"):
        registry.register_plugin(_Clashing(), "test-clash")
    assert registry._extra == [] and "test-clash" not in registry.get_registry().failed  # not kept


def test_extra_plugins_clashing_with_each_other_the_first_wins(monkeypatch):
    monkeypatch.delenv("KVPOLICY_STRICT_PLUGINS", raising=False)
    with pytest.warns(RuntimeWarning, match=r"'second' from distribution '\(registered at run time\)' refused: "
                                            r"scorer 'test-first-half' is already registered by plugin 'first'"):
        reg = registry.build_registry(extra_plugins=[("first", _RuntimePlugin()), ("second", _Clashing())])
    assert reg.components[("scorer", "test-first-half")].plugin == "first"
    assert reg.presets["h2o"].plugin == "baselines" and set(reg.failed) == {"second"}


def test_the_same_plugin_object_under_two_names_is_a_load_failure(monkeypatch):
    monkeypatch.delenv("KVPOLICY_STRICT_PLUGINS", raising=False)
    plugin = _RuntimePlugin()
    with pytest.warns(RuntimeWarning, match=r"'twice' from distribution '\(registered at run time\)' cannot be "
                                            r"registered: ValueError"):
        reg = registry.build_registry(extra_plugins=[("once", plugin), ("twice", plugin)])
    assert reg.components[("scorer", "test-first-half")].plugin == "once" and set(reg.failed) == {"twice"}


def test_unknown_name_suggests_close_matches():
    reg = registry.get_registry()
    with pytest.raises(UnknownComponentError) as err:
        reg.component("scorer", "snapvk")
    assert "unknown scorer 'snapvk' - did you mean 'snapkv'?" in str(err.value)
    assert "allowed: " in str(err.value) and "knorm" in str(err.value)
    with pytest.raises(UnknownComponentError, match="unknown component kind 'scorers'; allowed: scorer, prior"):
        reg.component("scorers", "knorm")


def test_cli_plugins_lists_kind_name_plugin_distribution_version_paper_description(capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    header, *rows = out.splitlines()
    assert header.split() == ["kind", "name", "plugin", "distribution", "paper", "description"]
    knorm = next(r for r in rows if r.split()[:2] == ["scorer", "knorm"])
    assert knorm.split()[2:5] == ["baselines", "kvpolicy", "0.1.0"]  # plugin: what KVPOLICY_DISABLE_PLUGINS takes
    assert "KnormPress: keep the keys of smallest L2 norm." in knorm
    assert any(r.split()[:3] == ["preset", "snapkv", "baselines"] for r in rows)
    assert not any(r.startswith(("FAILED", "DISABLED")) for r in rows)  # nothing failed: the table only
    assert main(["plugins", "--json"]) == 0
    import json

    data = json.loads(capsys.readouterr().out)
    assert {"kind": "merger", "name": "none", "plugin": "baselines", "distribution": "kvpolicy 0.1.0", "paper": "",
            "description": "Evict: keep the selected entries unchanged, drop the others."} in data
    by_name = {(r["kind"], r["name"]): r["paper"] for r in data}
    assert by_name[("scorer", "snapkv")].endswith("arXiv:2404.14469")
    assert by_name[("preset", "h2o-cam")].startswith("CaM")  # a preset takes its defining step's paper


def test_every_builtin_method_preset_names_its_paper():
    """Each preset's paper: its own, else its defining step's (merger > selector > schedule > scorer)."""
    reg = registry.get_registry()
    papers = {name: reg.paper_of(item) for name, item in reg.presets.items()}
    # nothing to cite: the uncompressed reference and random eviction
    assert {n for n, p in papers.items() if not p} == {"full", "random"}
    assert papers["lookm-pivot"].startswith("LOOK-M") and papers["lookm-pivot-fast"] == papers["lookm-pivot"]
    assert papers["pyramidkv"].startswith("PyramidKV")  # the schedule defines it, not its SnapKV scorer
    assert papers["adakv-snapkv"].startswith("Ada-KV") and papers["kvzip"].startswith("KVzip")  # own paper wins
    assert papers["elastic-cache"].startswith("Elastic Cache") and papers["kvmerger"].startswith("KVMerger")
    assert papers["h2o-mass"].startswith("kvpolicy's own")
    # a third-party preset: its own paper, or none, in which case its steps decide
    own = registry.Preset("x", {"scorer": "snapkv", "budget": {"ratio": 0.2}}, "d", "Someone 2026")
    assert reg.paper_of(registry.Registered("preset", "x", own, "p", "d", "1", "d", own.paper)) == "Someone 2026"
    bare = registry.Preset("y", {"scorer": {"name": "tova"}, "budget": {"ratio": 0.2}})
    assert reg.paper_of(registry.Registered("preset", "y", bare, "p", "d", "1", "")).startswith("TOVA")


def test_cli_plugins_prints_failed_and_disabled_plugins_on_stdout(capsys, monkeypatch):
    monkeypatch.delenv("KVPOLICY_STRICT_PLUGINS", raising=False)
    with pytest.warns(RuntimeWarning, match="'test-clash' .* refused"):
        registry.register_plugin(_Clashing(), "test-clash")
        registry.disable_plugin("lookm")  # reloads: the refusal is warned again
    try:
        assert main(["plugins"]) == 0
        out = capsys.readouterr().out.splitlines()
        assert "FAILED test-clash: " + registry.get_registry().failed["test-clash"] in out
        assert "DISABLED lookm (distribution kvpolicy)" in out
        assert main(["plugins", "--json"]) == 0
        captured = capsys.readouterr()
        assert "FAILED test-clash: " in captured.err and "DISABLED lookm" in captured.err
        assert "test-clash" not in captured.out  # stdout stays one JSON document
    finally:
        registry.unregister_plugin("test-clash")
        registry.enable_plugin("lookm")
