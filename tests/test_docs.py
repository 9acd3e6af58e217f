"""The documentation cannot drift from the code.

* Every ```python block of every ``docs/**/*.md`` page and of ``README.md`` is executed, in order, the
  blocks of one page sharing a namespace (a ```pycon block, or one made of ``>>>`` lines, runs as a
  doctest: its printed output and exception messages are compared). A block opts
  out only with a ``# docs: no-run <reason>`` comment (things that cannot run here, e.g. a collector).
* Every YAML / JSON / TOML block that is a policy config (it has ``budget`` and ``scorer``) is validated
  with :func:`kvpolicy.load_config`.
* The docstring examples of the kvpolicy modules and of the built-in plugins run as doctests.
* The site's generated configuration reference covers every registered component and parameter, and
  every page under ``docs/`` is in the nav of ``mkdocs.yml``.

Blocks that load the embedded model (``kvpolicy.models.load_default()``) get the session's ``smollm2``
fixture instead of a second copy.
"""

from __future__ import annotations

import doctest
import importlib
import json
import re
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
NO_RUN = "# docs: no-run"
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$",
                   re.MULTILINE | re.DOTALL)
PY_LANGS = {"python", "py", "pycon"}  # pycon: a doctest session (its output is checked)
CONFIG_LANGS = {"yaml": yaml.safe_load, "yml": yaml.safe_load, "json": json.loads, "toml": tomllib.loads}


def md_pages() -> list[Path]:
    return sorted(DOCS.rglob("*.md")) + [ROOT / "README.md"]


def blocks(path: Path) -> list[tuple[int, str, str]]:
    """``(first code line, language, code)`` of every fenced block of a Markdown file (dedented)."""
    text = path.read_text(encoding="utf-8")
    out = []
    for m in FENCE.finditer(text):
        indent = m.group("indent")
        lines = m.group("body").splitlines(keepends=True)
        code = "".join(ln[len(indent):] if ln.startswith(indent) else ln.lstrip() for ln in lines)
        line = text.count("\n", 0, m.start("body")) + 1
        out.append((line, m.group("lang").lower(), code))
    return out


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _pages_with(langs: set[str]) -> list[Path]:
    return [p for p in md_pages() if any(lang in langs for _, lang, _ in blocks(p))]


def _check_opt_out(page: Path, line: int, code: str) -> bool:
    """True when the block opts out; the marker must give a reason."""
    for ln in code.splitlines():
        if NO_RUN in ln:
            reason = ln.split(NO_RUN, 1)[1].strip(" -:()")
            assert reason, f"{_rel(page)}:{line}: '{NO_RUN}' must say why the block cannot run here"
            return True
    return False


@pytest.fixture
def docs_env(request, monkeypatch, tmp_path):
    """Run in a scratch directory; ``load_default()`` returns the session's SmolLM2."""
    from kvpolicy import models

    real = models.load_default

    def shared(name=models.DEFAULT_NAME, **kwargs):
        if kwargs or name != models.DEFAULT_NAME:  # another model or dtype: a model of its own
            return real(name, **kwargs)
        monkeypatch.setattr(models, "load_default", real)  # the fixture itself calls load_default()
        try:
            return request.getfixturevalue("smollm2")
        finally:
            monkeypatch.setattr(models, "load_default", shared)

    monkeypatch.setattr(models, "load_default", shared)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("page", _pages_with(PY_LANGS), ids=_rel)
def test_python_blocks_run(page: Path, docs_env) -> None:
    ns: dict = {"__name__": "__docs__"}
    ran = 0
    for line, lang, code in blocks(page):
        if lang not in PY_LANGS or _check_opt_out(page, line, code):
            continue
        where = f"{_rel(page)}:{line}"
        if lang == "pycon" or code.lstrip().startswith(">>>"):
            test = doctest.DocTestParser().get_doctest(code, ns, where, str(page), line - 1)
            runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
            report: list[str] = []
            runner.run(test, out=report.append, clear_globs=False)
            ns.update(test.globs)  # DocTest works on a copy of the page's namespace
            assert runner.failures == 0, f"{where}: doctest block failed:\n{''.join(report)}"
        else:
            # pad so that tracebacks give the line numbers of the Markdown file
            exec(compile("\n" * (line - 1) + code, str(page), "exec"), ns)  # noqa: S102 - the docs' own code
        ran += 1
    assert ran > 0 or all(_check_opt_out(page, ln, c) for ln, lg, c in blocks(page) if lg in PY_LANGS)


@pytest.mark.parametrize("page", _pages_with(set(CONFIG_LANGS)), ids=_rel)
def test_config_blocks_validate(page: Path) -> None:
    import kvpolicy

    for line, lang, code in blocks(page):
        if lang not in CONFIG_LANGS or _check_opt_out(page, line, code):
            continue
        try:
            data = CONFIG_LANGS[lang](code)
        except (ValueError, yaml.YAMLError):  # not a whole document (JSON lines, an excerpt): not a config
            continue
        if isinstance(data, dict) and "budget" in data and "scorer" in data:
            try:
                kvpolicy.load_config(data)
            except kvpolicy.ConfigError as err:
                if "error" not in code.lower():  # a block that shows an invalid config says so
                    raise AssertionError(f"{_rel(page)}:{line}: invalid policy config: {err}") from err


def _modules_with_examples() -> list[str]:
    names = []
    for pkg_dir in [ROOT / "kvpolicy", *sorted((ROOT / "plugins").glob("kvpolicy_*"))]:
        for f in sorted(pkg_dir.rglob("*.py")):
            if ">>>" in f.read_text(encoding="utf-8"):
                rel = f.relative_to(pkg_dir.parent).with_suffix("")
                parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
                names.append(".".join(parts))
    return names


@pytest.mark.parametrize("module", _modules_with_examples())
def test_module_doctests(module: str) -> None:
    mod = importlib.import_module(module)
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.attempted > 0, f"{module}: '>>>' found in the source but no doctest collected"
    assert result.failed == 0, f"{module}: {result.failed} doctest example(s) failed (see the captured output)"


# ----------------------------------------------------------------------------------- the site itself
@pytest.fixture(scope="module")
def hooks():
    sys.path.insert(0, str(ROOT))
    try:
        return importlib.import_module("mkdocs_hooks")
    finally:
        sys.path.remove(str(ROOT))


def test_configuration_reference_covers_registry(hooks) -> None:
    from kvpolicy import policy_schema
    from kvpolicy.config import STEP_FIELDS
    from kvpolicy.policy import Budget
    from kvpolicy.registry import get_registry

    reg = get_registry()
    text = hooks.configuration_reference()
    assert reg.components, "no component registered: the plugins did not load"
    field_of = {kind: field_name for field_name, kind in STEP_FIELDS.items()}
    for (kind, name), rec in reg.components.items():
        step_section = text.split(f"{{#{field_of[kind]}}}", 1)[1].split("\n## ", 1)[0]
        section = step_section.split(f"### `{name}`", 1)
        assert len(section) == 2, f"{kind} {name!r} missing from the configuration reference"
        body = section[1].split("\n### ", 1)[0]
        for param in rec.obj.model_fields:
            assert f"| `{param}` |" in body, f"{kind} {name!r}: parameter {param!r} missing"
    for param in Budget.model_fields:
        assert f"| `{param}` |" in text
    for preset in reg.presets:
        assert f"| `{preset}` |" in text
    assert json.dumps(policy_schema(), indent=2).splitlines()[1].strip() in text


def test_methods_index_lists_every_preset_with_its_paper_and_page(hooks) -> None:
    from kvpolicy.registry import get_registry

    reg = get_registry()
    text = hooks.methods_index()
    for name, item in reg.presets.items():
        row = next((line for line in text.splitlines() if line.startswith(f"| `{name}` |")), None)
        assert row is not None, f"preset {name!r} missing from the methods index"
        cells = [c.strip() for c in row.split(" | ")]
        assert cells[1] == (hooks._cell(reg.paper_of(item)) or "-")
        page = hooks.METHOD_PAGES[item.plugin]  # every built-in plugin has its page, and the page exists
        assert f"]({page})" in cells[2] and (DOCS / "methods" / page).is_file()
    assert "| `h2o-cam` | CaM, Zhang et al., ICML 2024" in text and "| `full` | - |" in text


def test_configuration_reference_table_cells(hooks) -> None:
    schema = {"properties": {"a": {"type": "integer", "minimum": 1, "default": 3, "description": "x | y"},
                             "b": {"anyOf": [{"type": "number", "exclusiveMinimum": 0}, {"type": "null"}]}},
              "required": ["b"]}
    rows = hooks._param_table(schema, {})
    assert rows[2] == "| `a` | integer | `3` | >= 1 | x \\| y |"
    assert rows[3] == "| `b` | number \\| null | *required* | > 0 |  |"


def _nav_pages(nav: list) -> list[str]:
    out: list[str] = []
    for item in nav:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        out += _nav_pages(value) if isinstance(value, list) else [value]
    return out


def test_every_page_is_in_the_nav(hooks) -> None:
    cfg = yaml.load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"), Loader=yaml.BaseLoader)
    nav = _nav_pages(cfg["nav"])
    for generated in (hooks.GENERATED, hooks.METHODS_INDEX):
        assert generated in nav and not (DOCS / generated).exists(), \
            f"{generated} is generated at build time; do not commit it under docs/"
    pages = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    assert not pages - set(nav), f"pages missing from the nav of mkdocs.yml: {sorted(pages - set(nav))}"


def test_missing_pages_leave_the_nav(hooks, tmp_path) -> None:
    (tmp_path / "here.md").write_text("# here\n")
    (tmp_path / "api").mkdir()
    (tmp_path / "api" / "gone.md").write_text("::: kvpolicy.no_such_module\n")
    (tmp_path / "api" / "ok.md").write_text("::: kvpolicy.ops\n")
    nav = [{"Here": "here.md"}, {"Later": "later.md"}, {"API": [{"gone": "api/gone.md"}, {"ok": "api/ok.md"}]},
           {"Only missing": [{"x": "x.md"}]}, {"Ref": hooks.GENERATED}]
    assert hooks._prune(nav, tmp_path) == [{"Here": "here.md"}, {"API": [{"ok": "api/ok.md"}]},
                                           {"Ref": hooks.GENERATED}]
