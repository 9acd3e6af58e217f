"""Exceptions raised by kvpolicy. Every message names the bad value and what is allowed."""

from __future__ import annotations


class KVPolicyError(Exception):
    """Base class of every error kvpolicy raises on purpose."""


class ConfigError(KVPolicyError, ValueError):
    """A policy configuration (file, dict or override) is invalid."""


class BudgetError(ConfigError):
    """A budget is out of range for the sequence it is applied to."""


class UnknownComponentError(ConfigError, KeyError):
    """A component or preset name is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class PluginError(KVPolicyError):
    """A plugin failed to load or conflicts with another plugin."""


class UnsupportedModelError(KVPolicyError, TypeError):
    """The model has layers or an architecture that the kvpolicy cache cannot serve."""


class CacheUsageError(KVPolicyError, RuntimeError):
    """The cache was used outside the contract (wrong model, wrong call order)."""
