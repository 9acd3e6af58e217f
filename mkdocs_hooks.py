"""MkDocs hooks of the kvpolicy site (registered under ``hooks:`` in ``mkdocs.yml``).

* ``configuration-reference.md`` is generated at build time from :func:`kvpolicy.policy_schema`, so it
  lists exactly the components and parameters registered when the site is built: it cannot go stale.
* :class:`SphinxRoles` (a griffe extension) turns the reST roles of the docstrings
  (``:class:`~kvpolicy.policy.Policy` ``) into cross-references of the API pages.
* Pages named in the nav but absent from ``docs/`` (written by other work in progress), and API pages
  whose ``::: module`` cannot be found, are left out of the build with an INFO line instead of failing
  ``mkdocs build --strict``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
from pathlib import Path
from typing import Any

import griffe

log = logging.getLogger("mkdocs.hooks.kvpolicy")

GENERATED = "configuration-reference.md"
#: the methods overview, generated at build time from the registry (every preset with its paper and page)
METHODS_INDEX = "methods/index.md"
#: the page under docs/methods/ that documents each built-in plugin's presets
METHOD_PAGES = {"baselines": "baselines.md", "lookm": "lookm.md", "elastic_cache": "elastic-cache.md",
                "kvmerger": "kvmerger.md", "beyond": "beyond.md", "presses": "presses.md",
                "structured": "structured.md", "adaptive": "adaptive.md", "related": "related.md"}
_DIRECTIVE = re.compile(r"^:::\s+([\w.]+)", re.MULTILINE)
STEP_TITLES = {"scorer": "Scorers", "prior": "Priors", "selector": "Selectors", "merger": "Mergers",
               "decode": "Decode rules", "layers": "Layer schedules"}


# ----------------------------------------------------------------------------------- configuration reference
def _type_of(prop: dict[str, Any], defs: dict[str, Any]) -> str:
    if "$ref" in prop:
        return prop["$ref"].rsplit("/", 1)[-1]
    if "const" in prop:
        return f"`{json.dumps(prop['const'])}`"
    if "enum" in prop:
        return " | ".join(f"`{json.dumps(v)}`" for v in prop["enum"])
    if "anyOf" in prop:
        return " | ".join(_type_of(p, defs) for p in prop["anyOf"])
    if prop.get("type") == "array":
        return f"list of {_type_of(prop.get('items', {}), defs)}"
    return str(prop.get("type", "any"))


_BOUNDS = (("exclusiveMinimum", ">"), ("minimum", ">="), ("exclusiveMaximum", "<"), ("maximum", "<="))


def _constraints(prop: dict[str, Any]) -> str:
    parts = []
    for p in [prop, *prop.get("anyOf", [])]:
        parts += [f"{op} {p[key]}" for key, op in _BOUNDS if key in p]
    return ", ".join(parts)


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _param_table(schema: dict[str, Any], defs: dict[str, Any], skip: tuple[str, ...] = ()) -> list[str]:
    props = {k: v for k, v in schema.get("properties", {}).items() if k not in skip}
    if not props:
        return ["No parameters.", ""]
    required = set(schema.get("required", []))
    rows = ["| parameter | type | default | allowed | description |", "|---|---|---|---|---|"]
    for name, prop in props.items():
        if name in required:
            default = "*required*"
        else:
            default = f"`{json.dumps(prop['default'])}`" if "default" in prop else "—"
        rows.append(f"| `{name}` | {_cell(_type_of(prop, defs))} | {_cell(default)} | "
                    f"{_cell(_constraints(prop))} | {_cell(prop.get('description', ''))} |")
    return rows + [""]


def configuration_reference(schema: dict[str, Any] | None = None) -> str:
    """The Markdown of ``configuration-reference.md``, rendered from ``kvpolicy.policy_schema()``."""
    from kvpolicy import policy_schema
    from kvpolicy.config import STEP_FIELDS
    from kvpolicy.registry import get_registry

    schema = policy_schema() if schema is None else schema
    defs = schema.get("$defs", {})
    reg = get_registry()
    out = [
        "# Configuration reference",
        "",
        "<!-- generated at build time by mkdocs_hooks.py from kvpolicy.policy_schema(); do not edit -->",
        "",
        "This page is generated when the site is built, from the JSON Schema that `kvpolicy schema` prints "
        "(`kvpolicy.policy_schema()`): every component registered by an installed plugin appears here with its "
        "parameters. A step is written `{name: ..., <parameters>}` or, without parameters, as a bare name.",
        "",
        "## Policy",
        "",
    ]
    out += _param_table(schema, defs, skip=tuple(STEP_FIELDS))
    out += ["Steps (one registered component each):", "",
            "| field | kind | required | default |", "|---|---|---|---|"]
    defaults = {"scorer": "*required*", "prior": "`null`", "selector": "`topk`", "merger": "`none`",
                "decode": "`none`", "layers": "`uniform`"}
    for field_name, kind in STEP_FIELDS.items():
        out.append(f"| [`{field_name}`](#{field_name}) | {kind} | "
                   f"{'yes' if field_name in schema.get('required', []) else 'no'} | {defaults[field_name]} |")
    out += ["", "## Budget", ""]
    budget = defs.get("Budget", {})
    if budget.get("description"):
        out += [" ".join(budget["description"].split()), ""]
    out += _param_table(budget, defs)
    for field_name in STEP_FIELDS:
        kind = STEP_FIELDS[field_name]
        out += [f"## {STEP_TITLES[field_name]} (`{field_name}`) {{#{field_name}}}", ""]
        variants = [v for v in schema["properties"][field_name]["anyOf"] if "properties" in v]
        if not variants:
            out += ["No component of this kind is registered.", ""]
        for v in variants:
            name = v["properties"]["name"]["const"]
            rec = reg.components.get((kind, name))
            origin = f" (plugin `{rec.plugin}`, distribution `{rec.distribution}`)" if rec is not None else ""
            out += [f"### `{name}`", "", f"{v['properties']['name'].get('description', '')}{origin}", ""]
            out += _param_table(v, defs, skip=("name",))
    out += ["## Presets", "", "| preset | description | plugin |", "|---|---|---|"]
    for name in sorted(reg.presets):
        rec = reg.presets[name]
        out.append(f"| `{name}` | {_cell(rec.description)} | `{rec.plugin}` |")
    out += ["", "## JSON Schema", "", '??? note "The full schema (`kvpolicy schema`)"', "",
            "    ```json"]
    out += ["    " + line for line in json.dumps(schema, indent=2).splitlines()]
    out += ["    ```", ""]
    return "\n".join(out)


# ----------------------------------------------------------------------------------- optional pages
def methods_index() -> str:
    """``methods/index.md``: every registered preset, its paper (:meth:`Registry.paper_of`), its page, its
    description, grouped by the plugin that provides it."""
    from kvpolicy.registry import get_registry

    reg = get_registry()
    lines = [
        "<!-- generated at build time by mkdocs_hooks.py from the plugin registry; do not edit -->",
        "# Every method",
        "",
        "This page is generated when the site is built, from the registry that `kvpolicy plugins` prints: each "
        "preset, the paper it follows (its own, or that of the step that defines it: merger, selector, layer "
        "schedule, then scorer) and the page that gives its formula, parameters, decisions and measured "
        "figures. Quality of every method side by side with kvpress: [results overview](../results/index.md).",
        "",
        "| preset | paper | page | what it does |",
        "|:---|:---|:---|:---|",
    ]
    for item in sorted(reg.presets.values(), key=lambda r: (r.plugin, r.name)):
        page = METHOD_PAGES.get(item.plugin)
        link = f"[{page[:-3]}]({page})" if page else f"plugin `{item.plugin}` ({item.distribution})"
        lines.append(f"| `{item.name}` | {_cell(reg.paper_of(item) or '-')} | {link} | {_cell(item.description)} |")
    return "\n".join(lines) + "\n"


def _module_found(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package is missing
        return False


def page_available(docs_dir: Path, path: str) -> bool:
    """Whether ``path`` (relative to ``docs_dir``) can be built: it exists (or is generated) and every
    ``::: module`` it renders can be found."""
    if path in (GENERATED, METHODS_INDEX):
        return True
    p = docs_dir / path
    if not p.is_file():
        return False
    if p.suffix == ".md":
        return all(_module_found(m) for m in _DIRECTIVE.findall(p.read_text(encoding="utf-8")))
    return True


def _prune(nav: list[Any], docs_dir: Path) -> list[Any]:
    out = []
    for item in nav:
        if isinstance(item, dict):
            (title, value), = item.items()
            if isinstance(value, list):
                sub = _prune(value, docs_dir)
                if sub:
                    out.append({title: sub})
            elif isinstance(value, str) and not value.startswith(("http://", "https://")) \
                    and not page_available(docs_dir, value):
                log.info("nav: leaving out %s (%s): not available yet", title, value)
            else:
                out.append(item)
        elif isinstance(item, str) and not page_available(docs_dir, item):
            log.info("nav: leaving out %s: not available yet", item)
        else:
            out.append(item)
    return out


def on_config(config: Any) -> Any:
    if config.nav:
        config.nav = _prune(config.nav, Path(config.docs_dir))
    return config


def on_files(files: Any, config: Any) -> Any:
    from mkdocs.structure.files import File

    docs_dir = Path(config.docs_dir)
    for f in list(files):
        if f.src_uri.endswith(".md") and not page_available(docs_dir, f.src_uri):
            log.info("leaving out %s: a module it documents cannot be found", f.src_uri)
            files.remove(f)
    files.append(File.generated(config, GENERATED, content=configuration_reference()))
    files.append(File.generated(config, METHODS_INDEX, content=methods_index()))
    return files


# ----------------------------------------------------------------------------------- docstring roles
_ROLE = re.compile(r":(?:class|func|meth|data|attr|mod|obj|exc):`(~?)([\w.]+)`")


class SphinxRoles(griffe.Extension):
    """Rewrite ``:role:`~a.b.C``` in docstrings as a cross-reference ``[`C`][a.b.C]`` when the target
    is documented on the site (a public object of ``documented`` modules), else as code ```C```."""

    def __init__(self, documented: list[str] | None = None) -> None:
        super().__init__()
        self.documented = tuple(documented or ())

    def _resolve(self, obj: griffe.Object, name: str, loader: griffe.GriffeLoader) -> str | None:
        scopes: list[Any] = []
        scope: Any = obj
        while scope is not None:
            scopes.append(scope)
            scope = scope.parent
        for sc in scopes:
            try:
                target = sc[name]
                break
            except (KeyError, ValueError, griffe.AliasResolutionError, griffe.CyclicAliasError):
                continue
        else:
            try:
                target = loader.modules_collection[name]
            except (KeyError, ValueError):
                return None
        try:
            path = target.final_target.path if target.is_alias else target.path
        except (griffe.AliasResolutionError, griffe.CyclicAliasError):
            return None
        documented = any(path == m or path.startswith(m + ".") for m in self.documented)
        private = any(part.startswith("_") for part in path.split("."))
        return path if documented and not private else None

    def _rewrite(self, obj: griffe.Object, loader: griffe.GriffeLoader) -> None:
        if obj.docstring is not None:
            def sub(m: re.Match[str]) -> str:
                tilde, name = m.groups()
                text = name.rsplit(".", 1)[-1] if tilde else name
                path = self._resolve(obj, name, loader)
                return f"[`{text}`][{path}]" if path else f"`{text}`"

            obj.docstring.value = _ROLE.sub(sub, obj.docstring.value)
        for member in obj.members.values():
            if not member.is_alias:
                self._rewrite(member, loader)

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        self._rewrite(pkg, loader)
