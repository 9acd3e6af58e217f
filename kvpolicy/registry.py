"""The plugin registry: a pluggy ``PluginManager`` fed from the ``kvpolicy`` entry-point group.

Built-in plugins (``plugins/`` in the repository) register through the same entry points as a
third-party package. Loading is lazy and happens once (:func:`get_registry`).

* Two plugins registering the same ``(kind, name)`` -> :class:`~kvpolicy.errors.PluginError` naming both
  distributions.
* A plugin that fails to import -> a warning naming the distribution and the error; the others load.
  ``strict=True`` (or ``KVPOLICY_STRICT_PLUGINS=1``) turns it into an error.
* ``KVPOLICY_DISABLE_PLUGINS="name1,name2"`` or :func:`disable_plugin` skips plugins by entry-point name.
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
class Registry:
    """Components by kind and name, presets by name, and the plugins that provided them."""

    components: dict[tuple[str, str], Registered] = field(default_factory=dict)
    presets: dict[str, Registered] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    disabled: set[str] = field(default_factory=set)
    manager: pluggy.PluginManager | None = None

    def component(self, kind: str, name: str) -> type[Component]:
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
        return sorted(n for k, n in self.components if k == kind)

    def _unknown(self, kind: str, name: str, allowed: list[str]) -> str:
        msg = f"unknown {kind} {name!r}"
        close = difflib.get_close_matches(str(name), allowed, n=3, cutoff=0.5)
        if close:
            msg += f" - did you mean {', '.join(repr(c) for c in close)}?"
        owners = [p for p in self.disabled if p == name]
        if owners:
            msg += f" (plugin {name!r} is disabled)"
        return msg + f"; allowed: {', '.join(allowed) or '(none registered)'}"

    def rows(self) -> list[Registered]:
        return sorted(list(self.components.values()) + list(self.presets.values()),
                      key=lambda r: (KINDS.index(r.kind) if r.kind in KINDS else len(KINDS), r.name))


def disable_plugin(name: str) -> None:
    """Skip the plugin registered under entry-point ``name`` (takes effect at the next :func:`reload`)."""
    _disabled.add(name)
    reload()


def enable_plugin(name: str) -> None:
    _disabled.discard(name)
    reload()


def _env_disabled() -> set[str]:
    raw = os.environ.get("KVPOLICY_DISABLE_PLUGINS", "")
    return {x.strip() for x in raw.split(",") if x.strip()}


def _dist_of(ep: EntryPoint) -> tuple[str, str]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "unknown", ""
    return dist.metadata["Name"], dist.version


def build_registry(strict: bool | None = None, extra_plugins: list[tuple[str, Any]] | None = None) -> Registry:
    """Load every plugin of the ``kvpolicy`` entry-point group (plus ``extra_plugins``) into a registry."""
    if strict is None:
        strict = os.environ.get("KVPOLICY_STRICT_PLUGINS", "") not in ("", "0", "false")
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    reg = Registry(manager=pm, disabled=_disabled | _env_disabled())
    sources: dict[str, tuple[str, str]] = {}
    eps = sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name)
    for ep in eps:
        dist, version = _dist_of(ep)
        if ep.name in reg.disabled or pm.has_plugin(ep.name):
            continue
        try:
            plugin = ep.load()
        except Exception as exc:  # noqa: BLE001 - any import failure of a third-party plugin
            msg = f"kvpolicy plugin {ep.name!r} from distribution {dist!r} failed to load: {exc!r}"
            if strict:
                raise PluginError(msg) from exc
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
            reg.failed[ep.name] = msg
            continue
        pm.register(plugin, name=ep.name)
        sources[ep.name] = (dist, version)
    for name, plugin in extra_plugins or []:
        if name not in reg.disabled:
            pm.register(plugin, name=name)
            sources[name] = ("(registered at run time)", "")
    for impl in pm.hook.kvpolicy_components.get_hookimpls():
        dist, version = sources.get(impl.plugin_name, ("unknown", ""))
        for cls in impl.function() or []:
            _add(reg.components, (cls.kind, cls.name), Registered(
                cls.kind, cls.name, cls, impl.plugin_name, dist, version, cls.description()))
    for impl in pm.hook.kvpolicy_presets.get_hookimpls():
        dist, version = sources.get(impl.plugin_name, ("unknown", ""))
        for preset in impl.function() or []:
            _add(reg.presets, preset.name, Registered(
                "preset", preset.name, preset, impl.plugin_name, dist, version, preset.description))
    return reg


def _add(table: dict, key: Any, item: Registered) -> None:
    old = table.get(key)
    if old is not None:
        what = f"{item.kind} {item.name!r}"
        raise PluginError(f"{what} is registered twice: by plugin {old.plugin!r} (distribution "
                          f"{old.distribution!r}) and by plugin {item.plugin!r} (distribution "
                          f"{item.distribution!r}); disable one with KVPOLICY_DISABLE_PLUGINS")
    if item.kind not in KINDS + ("preset",):
        raise PluginError(f"plugin {item.plugin!r} registers {item.name!r} of unknown kind {item.kind!r}; "
                          f"allowed: {', '.join(KINDS)}")
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
    """Register a plugin object at run time (same hooks as an entry-point plugin), then reload."""
    _extra.append((name, plugin))
    reload()


def unregister_plugin(name: str) -> None:
    _extra[:] = [(n, p) for n, p in _extra if n != name]
    reload()


def reload() -> Registry:
    """Forget the loaded registry; the next :func:`get_registry` rebuilds it."""
    global _registry
    _registry = None
    return get_registry()
