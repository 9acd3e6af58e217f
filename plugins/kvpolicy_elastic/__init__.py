"""Elastic Cache (arXiv 2407.18121) as a kvpolicy plugin.

Steps: scorer ``elastic-importance`` (head-averaged accumulated attention), selector ``elastic-anchors``
(sinks + top-importance anchors + last prompt entry, ``T - F`` entries), merger ``elastic-bucket``
(nearest-anchor uniform mean), decode rule ``fixed-point`` (delete index ``p*`` whenever the cache
exceeds ``gamma * n_seen``).

Presets: ``elastic-cache`` (budget ratio 0.2 as the paper's speed table, 1 sink, ``distance = -25``),
``elastic-cache-compat`` (the reference code's anchor choice and off-by-one), and two forms beyond the
paper: ``elastic-cache-mass`` (the same bucket mean with a ``+log n`` attention logit bias on merged
entries) and ``elastic-cache-vonly`` (values merged, anchors keep their keys, ``+log n``). See
:mod:`kvpolicy_elastic.elastic` for the algorithm and the decisions taken.
"""

from __future__ import annotations

from kvpolicy.hookspecs import hookimpl
from kvpolicy.registry import Preset, estimated

from kvpolicy_elastic.elastic import (ElasticAnchors, ElasticBucket, ElasticImportance, FixedPoint, bucket_fold,
                                      bucket_merge, bucket_owner, candidates, choose_anchors, fixed_point,
                                      fixed_point_rows, keep_count, pack_right)

__all__ = ["ElasticAnchors", "ElasticBucket", "ElasticImportance", "FixedPoint", "bucket_fold", "bucket_merge",
           "bucket_owner", "candidates", "choose_anchors", "fixed_point", "fixed_point_rows", "keep_count",
           "pack_right"]


@hookimpl
def kvpolicy_components() -> list[type]:
    return [ElasticImportance, ElasticAnchors, ElasticBucket, FixedPoint]


def _config(name: str, desc: str, compat: bool, merger: dict | None = None) -> dict:
    return {
        "name": name,
        "description": desc,
        "budget": {"ratio": 0.2, "sink": 1},
        "scorer": {"name": "elastic-importance"},
        "selector": {"name": "elastic-anchors", "compat": compat},
        "merger": {"name": "elastic-bucket", **(merger or {})},
        "decode": {"name": "fixed-point", "distance": -25},
        "layers": {"name": "uniform"},
    }


@hookimpl
def kvpolicy_presets() -> list[Preset]:
    items = [("elastic-cache", "Elastic Cache: importance anchors, nearest-anchor merge, fixed-point decode", False,
              None),
             ("elastic-cache-compat", "Elastic Cache as the reference code (rank/index mix-up, T-F-1 entries)",
              True, None),
             ("elastic-cache-mass", "Elastic Cache with the bucket mean of keys and values and a +log n logit bias",
              False, {"mass": True}),
             ("elastic-cache-vonly", "Elastic Cache merging values only (anchors keep their keys), +log n logit bias",
              False, {"keys": "keep", "mass": True})]
    presets = [Preset(name, _config(name, desc, compat, merger), desc) for name, desc, compat, merger in items]
    return presets + [estimated(presets[0])]
