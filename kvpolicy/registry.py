"""The plugin registry: a pluggy ``PluginManager`` fed from the ``kvpolicy`` entry-point group.

Built-in plugins (``plugins/`` in the repository) register through the same entry points as a
third-party package. Loading is lazy and happens once (:func:`get_registry`).

* Plugins load in priority order: the built-ins (the entry points of the ``kvpolicy`` distribution
  itself), then the other entry points by entry-point name, then :func:`register_plugin` plugins in the
  order they were registered.
* A plugin that registers a ``(kind, name)`` or a preset name that a plugin loaded before it already
  registered, or whose entry-point name is already taken, is refused: a ``RuntimeWarning`` naming both
  plugins and both distributions, none of its components and presets are registered, and it is listed
  in :attr:`Registry.failed`. The built-in always wins; so does the first of two third-party plugins.
* A plugin that fails to import (or whose hook raises, or returns something that is not a component /
  preset) -> a ``RuntimeWarning`` naming the plugin, its distribution and the error; every other plugin
  still loads.
* ``strict=True`` (or ``KVPOLICY_STRICT_PLUGINS=1``) turns every refusal and failure into a
  :class:`~kvpolicy.errors.PluginError`.
* ``KVPOLICY_DISABLE_PLUGINS="name1,name2"`` or :func:`disable_plugin` skips plugins by entry-point name.
  A config that names a component of a disabled plugin gets an error saying so.
* :func:`register_plugin` adds a plugin object at run time (tests, notebooks) with the same hooks.
"""

from __future__ import annotations

import difflib
import os
import warnings
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import pluggy

from kvpolicy import hookspecs
from kvpolicy.errors import PluginError, UnknownComponentError
from kvpolicy.policy import Component

KINDS = ("scorer", "prior", "selector", "merger", "decode", "schedule")
ENTRY_POINT_GROUP = "kvpolicy"
DISABLE_ENV = "KVPOLICY_DISABLE_PLUGINS"
STRICT_ENV = "KVPOLICY_STRICT_PLUGINS"
BUILTIN_DISTRIBUTION = "kvpolicy"  # entry points of this distribution are the built-in plugins
RUNTIME_DISTRIBUTION = "(registered at run time)"  # the distribution shown for register_plugin() plugins
_disabled: set[str] = set()


@dataclass(frozen=True)
class Preset:
    """A named policy configuration (the mapping :func:`kvpolicy.load_policy` accepts)."""

    name: str
    config: dict[str, Any]
    description: str = ""
    #: the paper the preset follows; empty: the paper of its defining step (:meth:`Registry.paper_of`)
    paper: str = ""


#: the query stride of the ``-fast`` presets (:func:`estimated`): measured on SmolLM2 to keep the exact
#: statistic's copy / continuation NLL within 0.05 at 2k and 6k tokens (docs/results/core.md)
ESTIMATE_STRIDE = 16


def estimated(preset: Preset, stride: int = ESTIMATE_STRIDE) -> Preset:
    """``<name>-fast``: ``preset`` with its accumulated-attention statistic estimated from every ``stride``-th
    prefill query (the scorer's ``query_stride``) instead of computed exactly inside the prefill attention.

    The faithful form stays one setting away: the preset itself, or ``scorer.query_stride: 1``.
    """
    scorer = preset.config.get("scorer") or {}
    if scorer.get("query_stride", 1) != 1:
        raise ValueError(f"preset {preset.name!r} already estimates its statistic (query_stride "
                         f"{scorer['query_stride']})")
    name = f"{preset.name}-fast"
    desc = f"{preset.description} (statistic from every {stride}th prefill query)"
    config = {**preset.config, "name": name, "description": desc, "scorer": {**scorer, "query_stride": stride}}
    return Preset(name, config, desc, preset.paper)


#: config keys in the order that defines a preset's method (:meth:`Registry.paper_of`), with their kinds
_DEFINING_STEPS = (("merger", "merger"), ("selector", "selector"), ("layers", "schedule"), ("scorer", "scorer"),
                   ("prior", "prior"), ("decode", "decode"))
_TRIVIAL_STEPS = frozenset({"none", "topk", "all", "uniform"})


@dataclass
class Registered:
    """A registered component or preset and where it came from."""

    kind: str
    name: str
    obj: Any
    plugin: str
    distribution: str
    version: str
    description: str
    paper: str = ""

    @property
    def key(self) -> str | tuple[str, str]:
        """The key in :attr:`Registry.presets` (the name) or :attr:`Registry.components` (``(kind, name)``)."""
        return self.name if self.kind == "preset" else (self.kind, self.name)


@dataclass
class DisabledPlugin:
    """A plugin skipped on purpose; ``source`` is loaded only to explain an unknown name."""

    name: str
    distribution: str
    source: EntryPoint | Any | None = None
    _provides: set[tuple[str, str]] | None = None

    def provides(self) -> set[tuple[str, str]]:
        """``{(kind, name)}`` the plugin would register (``("preset", name)`` for presets); best effort."""
        if self._provides is None:
            self._provides = set()
            try:
                plugin = self.source.load() if isinstance(self.source, EntryPoint) else self.source
                for cls in _call(plugin, "kvpolicy_components"):
                    self._provides.add((getattr(cls, "kind", "?"), getattr(cls, "name", "?")))
                for preset in _call(plugin, "kvpolicy_presets"):
                    self._provides.add(("preset", getattr(preset, "name", "?")))
            except Exception:  # noqa: BLE001 - only used to improve an error message
                pass
        return self._provides


def _call(plugin: Any, hook: str) -> list[Any]:
    fn = getattr(plugin, hook, None)
    return list(fn() or []) if callable(fn) else []


@dataclass
class Registry:
    """Components by kind and name, presets by name, and the plugins that provided them."""

    components: dict[tuple[str, str], Registered] = field(default_factory=dict)
    presets: dict[str, Registered] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # plugin name -> why it failed or was refused
    disabled: dict[str, DisabledPlugin] = field(default_factory=dict)
    plugins: dict[str, tuple[str, str]] = field(default_factory=dict)  # plugin name -> (distribution, version)
    manager: pluggy.PluginManager | None = None

    def table(self, kind: str) -> dict[Any, Registered]:
        """:attr:`presets` for ``"preset"``, else :attr:`components`."""
        return self.presets if kind == "preset" else self.components

    def component(self, kind: str, name: str) -> type[Component]:
        """The component class registered as ``(kind, name)``; :class:`UnknownComponentError` otherwise."""
        if kind not in KINDS:
            raise UnknownComponentError(f"unknown component kind {kind!r}; allowed: {', '.join(KINDS)}")
        hit = self.components.get((kind, name))
        if hit is None:
            raise UnknownComponentError(self._unknown(kind, name, self.names(kind)))
        return hit.obj

    def preset(self, name: str) -> Preset:
        hit = self.presets.get(name)
        if hit is None:
            raise UnknownComponentError(self._unknown("preset", name, sorted(self.presets)))
        return hit.obj

    def names(self, kind: str) -> list[str]:
        """Registered names of ``kind`` (``"preset"`` lists the presets)."""
        if kind == "preset":
            return sorted(self.presets)
        return sorted(n for k, n in self.components if k == kind)

    def _unknown(self, kind: str, name: str, allowed: list[str]) -> str:
        for plugin in self.disabled.values():
            if (kind, name) in plugin.provides():
                return (f"{kind} {name!r} is provided by plugin {plugin.name!r} (distribution "
                        f"{plugin.distribution!r}), which is disabled; enable it by removing it from "
                        f"{DISABLE_ENV} or with kvpolicy.registry.enable_plugin({plugin.name!r})")
        msg = f"unknown {kind} {name!r}"
        close = difflib.get_close_matches(str(name), allowed, n=3, cutoff=0.5)
        if close:
            msg += f" - did you mean {' or '.join(repr(c) for c in close)}?"
        msg += f"; allowed: {', '.join(allowed) or '(none registered)'}"
        if self.failed:
            msg += f" (plugins that failed to load: {', '.join(sorted(self.failed))}; see `kvpolicy plugins`)"
        return msg

    def paper_of(self, item: Registered) -> str:
        """The paper ``item`` follows: its own, or for a preset without one the paper of its defining step.

        A preset's defining step is the first non-trivial one of merger, selector, layer schedule, scorer, prior,
        decode rule (a merge method is named by its merge, a budget method by its schedule, an eviction by its
        scorer); trivial steps (``none``, ``topk``, ``all``, ``uniform``) define nothing, and a preset whose
        selector keeps everything (``all``) follows no paper.
        """
        if item.paper or item.kind != "preset":
            return item.paper
        steps = {key: spec.get("name") if isinstance(spec, dict) else spec
                 for key, spec in item.obj.config.items() if key in dict(_DEFINING_STEPS)}
        if steps.get("selector") == "all":
            return ""  # keeps everything: no compression method
        for key, kind in _DEFINING_STEPS:
            step = steps.get(key)
            if step and step not in _TRIVIAL_STEPS:
                hit = self.components.get((kind, str(step)))
                return hit.paper if hit is not None else ""
        return ""

    def rows(self) -> list[Registered]:
        return sorted(list(self.components.values()) + list(self.presets.values()),
                      key=lambda r: (KINDS.index(r.kind) if r.kind in KINDS else len(KINDS), r.name))


def disable_plugin(name: str) -> None:
    """Skip the plugin registered under entry-point (or run-time) ``name``; reloads the registry."""
    _disabled.add(name)
    reload()


def enable_plugin(name: str) -> None:
    """Undo :func:`disable_plugin` (a plugin disabled through the environment stays disabled)."""
    _disabled.discard(name)
    reload()


def _env_disabled() -> set[str]:
    raw = os.environ.get(DISABLE_ENV, "")
    return {x.strip() for x in raw.split(",") if x.strip()}


def _dist_of(ep: EntryPoint) -> tuple[str, str]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "unknown", ""
    return dist.metadata["Name"], dist.version


class _Loader:
    """Collects load failures and refusals: a warning each, or a :class:`PluginError` in strict mode."""

    def __init__(self, reg: Registry, strict: bool) -> None:
        self.reg, self.strict = reg, strict

    def fail(self, plugin: str, dist: str, what: str, exc: BaseException | None = None) -> None:
        msg = f"kvpolicy plugin {plugin!r} from distribution {dist!r} {what}"
        if exc is not None:
            msg += f": {exc!r}"
        if self.strict:
            raise PluginError(msg + f" (strict mode: unset {STRICT_ENV} to only warn)") from exc
        warnings.warn(msg, RuntimeWarning, stacklevel=4)
        self.reg.failed[plugin] = msg


_REFUSED = (f"none of its components or presets are registered (built-in plugins win, then the first "
            f"entry point by name, then run-time plugins in registration order); rename the clashing names "
            f"or disable one plugin with {DISABLE_ENV}")


def build_registry(strict: bool | None = None, extra_plugins: list[tuple[str, Any]] | None = None) -> Registry:
    """Load every plugin of the ``kvpolicy`` entry-point group (plus ``extra_plugins``) into a registry.

    Plugins load in priority order: the built-ins (entry points of the ``kvpolicy`` distribution), then
    third-party entry points by name, then ``extra_plugins`` in order. A plugin that clashes with one
    loaded before it is refused (see the module docstring).

    Args:
        strict: turn load failures and refusals into :class:`PluginError` (default: ``KVPOLICY_STRICT_PLUGINS``).
        extra_plugins: ``(name, plugin)`` pairs registered after the entry points.
    """
    if strict is None:
        strict = os.environ.get(STRICT_ENV, "").lower() not in ("", "0", "false", "no")
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    reg = Registry(manager=pm)
    off = _disabled | _env_disabled()
    loader = _Loader(reg, strict)
    candidates: list[tuple[str, str, str, Any]] = []  # (name, dist, version, entry point or object)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        dist, version = _dist_of(ep)
        candidates.append((ep.name, dist, version, ep))
    candidates.sort(key=lambda c: (c[1] != BUILTIN_DISTRIBUTION, c[0]))  # built-ins first, then by name
    for name, plugin in extra_plugins or []:
        candidates.append((name, RUNTIME_DISTRIBUTION, "", plugin))
    for name, dist, version, source in candidates:
        if name in off:
            reg.disabled[name] = DisabledPlugin(name, dist, source)
            continue
        if name in reg.plugins:
            loader.fail(name, dist, f"refused: another kvpolicy plugin named {name!r} (distribution "
                                    f"{reg.plugins[name][0]!r}) is already loaded; {_REFUSED}")
            continue
        try:
            plugin = source.load() if isinstance(source, EntryPoint) else source
        except Exception as exc:  # noqa: BLE001 - any import failure of a third-party plugin
            loader.fail(name, dist, "failed to load", exc)
            continue
        try:
            pm.register(plugin, name=name)
        except (ValueError, pluggy.PluginValidationError) as exc:  # the same module twice, a bad hook signature
            loader.fail(name, dist, "cannot be registered", exc)
            continue
        reg.plugins[name] = (dist, version)
    for name, (dist, version) in list(reg.plugins.items()):  # priority order: the first one wins a clash
        items = _contribution(loader, pm, name, dist, version)
        clashes = _clashes(reg, items)
        if clashes:
            pm.unregister(name=name)
            del reg.plugins[name]
            loader.fail(name, dist, f"refused: {'; '.join(clashes)}; {_REFUSED}")
            continue
        for item in items:
            reg.table(item.kind)[item.key] = item
    return reg


def _contribution(loader: _Loader, pm: pluggy.PluginManager, name: str, dist: str, version: str
                  ) -> list[Registered]:
    """The components and presets plugin ``name`` returns; invalid items are load failures and skipped."""
    items: list[Registered] = []
    for impl in _impls(pm, "kvpolicy_components", name):
        for cls in _run_hook(loader, impl, dist):
            if not (isinstance(cls, type) and issubclass(cls, Component) and cls.name and cls.kind in KINDS):
                loader.fail(name, dist, f"returned {cls!r} from kvpolicy_components(); allowed: subclasses of "
                                        f"kvpolicy.Scorer, Prior, Selector, Merger, DecodeRule or LayerSchedule "
                                        f"with a class attribute `name`")
                continue
            items.append(Registered(cls.kind, cls.name, cls, name, dist, version, cls.description(),
                                    str(getattr(cls, "paper", "") or "")))
    for impl in _impls(pm, "kvpolicy_presets", name):
        for preset in _run_hook(loader, impl, dist):
            if not (isinstance(preset, Preset) and isinstance(preset.config, dict)):
                loader.fail(name, dist, f"returned {preset!r} from kvpolicy_presets(); allowed: "
                                        f"kvpolicy.Preset(name, config_mapping, description)")
                continue
            items.append(Registered("preset", preset.name, preset, name, dist, version, preset.description,
                                    preset.paper))
    return items


def _impls(pm: pluggy.PluginManager, hook: str, plugin_name: str) -> list[Any]:
    return [impl for impl in getattr(pm.hook, hook).get_hookimpls() if impl.plugin_name == plugin_name]


def _run_hook(loader: _Loader, impl: Any, dist: str) -> list[Any]:
    try:
        return list(impl.function() or [])
    except Exception as exc:  # noqa: BLE001 - a broken plugin must not break the others
        loader.fail(impl.plugin_name, dist, f"raised in {impl.function.__name__}()", exc)
        return []


def _clashes(reg: Registry, items: list[Registered]) -> list[str]:
    """What in ``items`` is already registered (or repeated within ``items``), one phrase each."""
    out: list[str] = []
    seen: set[Any] = set()
    for item in items:
        what = f"{item.kind} {item.name!r}"
        old = reg.table(item.kind).get(item.key)
        if old is not None:
            out.append(f"{what} is already registered by plugin {old.plugin!r} (distribution {old.distribution!r})")
        elif item.key in seen:
            out.append(f"{what} is returned twice by this plugin")
        seen.add(item.key)
    return out


_registry: Registry | None = None
_extra: list[tuple[str, Any]] = []


def get_registry() -> Registry:
    """The process-wide registry (built on first use)."""
    global _registry
    if _registry is None:
        _registry = build_registry(extra_plugins=_extra)
    return _registry


def register_plugin(plugin: Any, name: str) -> None:
    """Register a plugin object (a module or object with hook functions) at run time, then reload.

    It loads after every entry point: a component or preset name that is already taken gets it refused
    (a ``RuntimeWarning``; it stays listed in :attr:`Registry.failed` until :func:`unregister_plugin`).
    In strict mode the :class:`PluginError` propagates and the plugin is not kept.
    """
    if any(n == name for n, _ in _extra):
        raise PluginError(f"a run-time kvpolicy plugin is already registered as {name!r}; "
                          f"call unregister_plugin({name!r}) first")
    _extra.append((name, plugin))
    try:
        reload()
    except Exception:
        _extra.pop()
        reload()
        raise


def unregister_plugin(name: str) -> None:
    """Remove a plugin added with :func:`register_plugin`, then reload."""
    _extra[:] = [(n, p) for n, p in _extra if n != name]
    reload()


def reload() -> Registry:
    """Rebuild the registry (after installing or disabling plugins)."""
    global _registry
    _registry = None
    return get_registry()
