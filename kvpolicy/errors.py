"""Exceptions raised by kvpolicy. Every message names the bad value and what is allowed."""

from __future__ import annotations


class KVPolicyError(Exception):
    """Base class of every error kvpolicy raises on purpose."""


class ConfigError(KVPolicyError, ValueError):
    """A policy configuration (file, dict or override) is invalid."""


class BudgetError(ConfigError):
    """A budget is out of range for the sequence it is applied to."""


class BudgetWarning(UserWarning):
    """A policy step could not keep a layer within its budget, or decides the size itself (the message
    names the preset or setting that meets the budget)."""


class UnknownComponentError(ConfigError, KeyError):
    """A component or preset name is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class PluginError(KVPolicyError):
    """A plugin failed to load or conflicts with another plugin (strict mode; otherwise a ``RuntimeWarning``)."""


class UnsupportedModelError(KVPolicyError, TypeError):
    """The model has layers or an architecture that the kvpolicy cache cannot serve."""


class CacheUsageError(KVPolicyError, RuntimeError):
    """The cache was used outside the contract (wrong model, wrong call order)."""


class StepOutputError(KVPolicyError, ValueError):
    """A policy step (scorer, prior, selector, merger) returned something outside its contract.

    ``prop`` names the broken property ("shape", "dtype/device", "finite", "order", "pads never kept").
    """

    def __init__(self, message: str, prop: str = "shape") -> None:
        super().__init__(message)
        self.prop = prop
