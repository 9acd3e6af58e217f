"""The plugin contract: hook specifications a kvpolicy plugin implements.

A plugin is a module (or object) with functions decorated by :data:`kvpolicy.hookimpl`, exposed by
its distribution under the ``kvpolicy`` entry-point group::

    [project.entry-points.kvpolicy]
    my_plugin = "my_package.plugin"

Both hooks are called once, when the registry loads (the first :func:`kvpolicy.load_policy`,
``kvpolicy plugins`` ..., or :func:`kvpolicy.registry.reload`); each implementation returns a list
(possibly empty). Components are registered under ``(kind, name)``; presets under their name.

What the registry does with the answers:

* a ``(kind, name)`` (or preset name) that a plugin loaded before already registered -> the later
  plugin is refused, whole (none of its components and presets are registered), with a
  ``RuntimeWarning`` naming both plugins and distributions; built-ins load first, then third-party
  entry points by name, then run-time plugins;
* an import error, an exception raised by a hook, or an item that is not a component class / a
  :class:`~kvpolicy.registry.Preset` -> a ``RuntimeWarning`` naming the plugin and its distribution;
  the other plugins still load;
* strict mode (``KVPOLICY_STRICT_PLUGINS=1``) turns both into a :class:`~kvpolicy.errors.PluginError`;
* ``KVPOLICY_DISABLE_PLUGINS=name,...`` skips plugins by entry-point name.

A component class may declare ``observations`` (what it asks the context for) and ``promises``
(properties :mod:`kvpolicy.testing` checks, see ``docs/testing.md``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from kvpolicy.policy import Component
    from kvpolicy.registry import Preset

PROJECT = "kvpolicy"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def kvpolicy_components() -> list[type[Component]]:
    """Return component classes: subclasses of :class:`~kvpolicy.policy.Scorer`, ``Prior``, ``Selector``,
    ``Merger``, ``DecodeRule`` or ``LayerSchedule``, each with a class attribute ``name`` unique within
    its kind. The class's pydantic fields are its parameters; its docstring's first line describes it."""


@hookspec
def kvpolicy_presets() -> list[Preset]:
    """Return :class:`~kvpolicy.registry.Preset` objects: named, complete policy configurations."""
