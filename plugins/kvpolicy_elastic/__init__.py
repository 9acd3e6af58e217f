"""Elastic Cache (arXiv 2407.18121) as a kvpolicy plugin.

Steps: scorer ``elastic-importance`` (head-averaged accumulated attention), selector ``elastic-anchors``
(sinks + top-importance anchors + last prompt entry, ``T - F`` entries), merger ``elastic-bucket``
(nearest-anchor uniform mean), decode rule ``fixed-point`` (delete index ``p*`` whenever the cache
exceeds ``gamma * n_seen``).

Presets: ``elastic-cache`` (budget ratio 0.2 as the paper's speed table, 1 sink, ``distance = -25``) and
``elastic-cache-compat`` (the reference code's anchor choice and off-by-one). See
:mod:`kvpolicy_elastic.elastic` for the algorithm and the decisions taken.
"""

from __future__ import annotations

from kvpolicy.hookspecs import hookimpl
from kvpolicy.registry import Preset

from kvpolicy_elastic.elastic import (ElasticAnchors, ElasticBucket, ElasticImportance, FixedPoint, bucket_merge,
                                      candidates, choose_anchors, fixed_point, keep_count, pack_right)

__all__ = ["ElasticAnchors", "ElasticBucket", "ElasticImportance", "FixedPoint", "bucket_merge", "candidates",
           "choose_anchors", "fixed_point", "keep_count", "pack_right"]


@hookimpl
def kvpolicy_components() -> list[type]:
    return [ElasticImportance, ElasticAnchors, ElasticBucket, FixedPoint]


def _config(name: str, desc: str, compat: bool) -> dict:
    return {
        "name": name,
        "description": desc,
        "budget": {"ratio": 0.2, "sink": 1},
        "scorer": {"name": "elastic-importance"},
        "selector": {"name": "elastic-anchors", "compat": compat},
        "merger": {"name": "elastic-bucket"},
        "decode": {"name": "fixed-point", "distance": -25},
        "layers": {"name": "uniform"},
    }


@hookimpl
def kvpolicy_presets() -> list[Preset]:
    items = [("elastic-cache", "Elastic Cache: importance anchors, nearest-anchor merge, fixed-point decode", False),
             ("elastic-cache-compat", "Elastic Cache as the reference code (rank/index mix-up, T-F-1 entries)",
              True)]
    return [Preset(name, _config(name, desc, compat), desc) for name, desc, compat in items]
