"""kvpolicy: composable KV-cache compression policies for Hugging Face transformers.

>>> import kvpolicy
>>> policy = kvpolicy.load_policy("snapkv", budget=0.2)
>>> policy.budget.ratio
0.2
"""

from __future__ import annotations

from kvpolicy import models
from kvpolicy.cache import CacheReport, KVPolicyCache
from kvpolicy.context import CompressedContext, pipeline
from kvpolicy.config import PolicyConfig, dump_policy, load_config, load_policy, policy_schema
from kvpolicy.errors import (BudgetError, CacheUsageError, ConfigError, KVPolicyError, PluginError,
                             StepOutputError, UnknownComponentError, UnsupportedModelError)
from kvpolicy.hookspecs import hookimpl
from kvpolicy.integrate import compress
from kvpolicy.policy import (Budget, CompressionContext, DecodeRule, LayerSchedule, Merged, Merger, Policy,
                             Prior, Scorer, Selection, Selector)
from kvpolicy.registry import Preset, get_registry

__version__ = "0.1.0"

__all__ = [
    "models", "compress", "CompressedContext", "pipeline", "load_policy", "load_config", "dump_policy", "policy_schema", "hookimpl",
    "KVPolicyCache", "CacheReport", "Policy", "PolicyConfig", "Budget", "CompressionContext", "Scorer",
    "Prior", "Selector", "Merger", "Merged", "Selection", "DecodeRule", "LayerSchedule", "Preset",
    "get_registry", "KVPolicyError", "ConfigError", "BudgetError", "UnknownComponentError", "PluginError",
    "UnsupportedModelError", "CacheUsageError", "StepOutputError", "__version__",
]
