"""The seed methods' related work: D2O, CORM, CaM, Cascading KV cache, VL-Cache.

Each method is one module of this package, read like its paper; its decisions where the paper is silent
are stated at the top of the module.
"""

from __future__ import annotations

from kvpolicy.hookspecs import hookimpl
from kvpolicy.registry import Preset


@hookimpl
def kvpolicy_components() -> list[type]:
    return []


@hookimpl
def kvpolicy_presets() -> list[Preset]:
    return []
