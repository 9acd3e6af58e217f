"""The plugin registry: a pluggy ``PluginManager`` fed from the ``kvpolicy`` entry-point group.

Built-in plugins (``plugins/`` in the repository) register through the same entry points as a
third-party package. Loading is lazy and happens once (:func:`get_registry`).

* Two plugins registering the same ``(kind, name)`` -> :class:`~kvpolicy.errors.PluginError` naming both
  plugins and both distributions.
* A plugin that fails to import (or whose hook raises, or returns something that is not a component /
  preset) -> a ``RuntimeWarning`` naming the plugin, its distribution and the error; every other plugin
  still loads. ``strict=True`` (or ``KVPOLICY_STRICT_PLUGINS=1``) turns it into a ``PluginError``.
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
_disabled: set[str] = set()


@dataclass(frozen=True)
class Preset:
    """A named policy configuration (the mapping :func:`kvpolicy.load_policy` accepts)."""

    name: str
    config: dict[str, Any]
    description: str = ""


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
    failed: dict[str, str] = field(default_factory=dict)  # plugin name -> error message
    disabled: dict[str, DisabledPlugin] = field(default_factory=dict)
    plugins: dict[str, tuple[str, str]] = field(default_factory=dict)  # plugin name -> (distribution, version)
    manager: pluggy.PluginManager | None = None

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
    """Collects load failures: a warning each, or a :class:`PluginError` in strict mode."""

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


def build_registry(strict: bool | None = None, extra_plugins: list[tuple[str, Any]] | None = None) -> Registry:
    """Load every plugin of the ``kvpolicy`` entry-point group (plus ``extra_plugins``) into a registry.

    Args:
        strict: turn load failures into :class:`PluginError` (default: ``KVPOLICY_STRICT_PLUGINS``).
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
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        dist, version = _dist_of(ep)
        candidates.append((ep.name, dist, version, ep))
    for name, plugin in extra_plugins or []:
        candidates.append((name, "(registered at run time)", "", plugin))
    for name, dist, version, source in candidates:
        if name in off:
            reg.disabled[name] = DisabledPlugin(name, dist, source)
            continue
        if name in reg.plugins:
            old_dist = reg.plugins[name][0]
            raise PluginError(f"two kvpolicy plugins are named {name!r}: one from distribution {old_dist!r}, "
                              f"one from {dist!r}; rename one entry point or disable it with {DISABLE_ENV}")
        try:
            plugin = source.load() if isinstance(source, EntryPoint) else source
        except Exception as exc:  # noqa: BLE001 - any import failure of a third-party plugin
            loader.fail(name, dist, "failed to load", exc)
            continue
        try:
            pm.register(plugin, name=name)
        except ValueError as exc:  # the same module under two names, or a bad hook signature
            raise PluginError(f"kvpolicy plugin {name!r} from distribution {dist!r} cannot be registered: "
                              f"{exc}") from exc
        reg.plugins[name] = (dist, version)
    for impl in pm.hook.kvpolicy_components.get_hookimpls():
        dist, version = reg.plugins[impl.plugin_name]
        items = _run_hook(loader, pm, impl, dist)
        for cls in items or []:
            if not (isinstance(cls, type) and issubclass(cls, Component) and cls.name):
                loader.fail(impl.plugin_name, dist, f"returned {cls!r} from kvpolicy_components(); allowed: "
                            f"subclasses of kvpolicy.Scorer, Prior, Selector, Merger, DecodeRule or "
                            f"LayerSchedule with a class attribute `name`")
                continue
            _add(reg.components, (cls.kind, cls.name), Registered(
                cls.kind, cls.name, cls, impl.plugin_name, dist, version, cls.description()))
    for impl in pm.hook.kvpolicy_presets.get_hookimpls():
        dist, version = reg.plugins[impl.plugin_name]
        for preset in _run_hook(loader, pm, impl, dist) or []:
            if not (isinstance(preset, Preset) and isinstance(preset.config, dict)):
                loader.fail(impl.plugin_name, dist, f"returned {preset!r} from kvpolicy_presets(); allowed: "
                            f"kvpolicy.Preset(name, config_mapping, description)")
                continue
            _add(reg.presets, preset.name, Registered(
                "preset", preset.name, preset, impl.plugin_name, dist, version, preset.description))
    return reg


def _run_hook(loader: _Loader, pm: pluggy.PluginManager, impl: Any, dist: str) -> list[Any] | None:
    try:
        return list(impl.function() or [])
    except Exception as exc:  # noqa: BLE001 - a broken plugin must not break the others
        loader.fail(impl.plugin_name, dist, f"raised in {impl.function.__name__}()", exc)
        return None


def _add(table: dict, key: Any, item: Registered) -> None:
    if item.kind not in KINDS + ("preset",):
        raise PluginError(f"plugin {item.plugin!r} (distribution {item.distribution!r}) registers {item.name!r} "
                          f"of unknown kind {item.kind!r}; allowed: {', '.join(KINDS)}")
    old = table.get(key)
    if old is not None:
        what = f"{item.kind} {item.name!r}"
        raise PluginError(f"{what} is registered twice: by plugin {old.plugin!r} (distribution "
                          f"{old.distribution!r}) and by plugin {item.plugin!r} (distribution "
                          f"{item.distribution!r}); disable one with {DISABLE_ENV}")
    table[key] = item


_registry: Registry | None = None
_extra: list[tuple[str, Any]] = []


def get_registry() -> Registry:
    """The process-wide registry (built on first use)."""
    global _registry
    if _registry is None:
        _registry = build_registry(extra_plugins=_extra)
    return _registry


def register_plugin(plugin: Any, name: str) -> None:
    """Register a plugin object (a module or object with hook functions) at run time, then reload."""
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
