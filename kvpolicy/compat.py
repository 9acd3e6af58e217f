"""The supported ``transformers`` releases, and the one call-signature difference between them.

The supported range is the one ``pyproject.toml`` declares for ``transformers`` (read back from the installed
package's metadata, so it is written in one place); :func:`kvpolicy.compress` refuses a ``transformers`` outside
it with a message naming both (set ``KVPOLICY_ANY_TRANSFORMERS=1`` to get a warning instead, e.g. to try a new
release before declaring it).

transformers 5.24 renamed the cache argument of ``forward()`` and ``generate()`` from ``past_key_values`` to
``cache`` (``past_key_values`` still works there, with a ``FutureWarning``); earlier releases know only
``past_key_values``: ``generate(cache=...)`` fails there ("model_kwargs are not used") and ``forward(cache=...)``
is swallowed by ``**kwargs`` and ignored. Inside ``kvpolicy.compress()`` both spellings work on every supported
release (:func:`cache_keyword`); outside it, pass a plain ``DynamicCache`` as ``**cache_kwargs(model, cache)``.
The choice is made from the model's ``forward`` signature, not from a version number.
"""

from __future__ import annotations

import functools
import inspect
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

from kvpolicy.errors import CacheUsageError, UnsupportedModelError

ANY_VERSION_ENV = "KVPOLICY_ANY_TRANSFORMERS"


@functools.cache
def supported_transformers() -> str | None:
    """The declared ``transformers`` specifier (e.g. ``">=5.16.1,<5.25"``), or None when kvpolicy runs uninstalled."""
    from importlib.metadata import PackageNotFoundError, requires

    from packaging.requirements import Requirement

    try:
        reqs = requires("kvpolicy") or []
    except PackageNotFoundError:
        return None
    for line in reqs:
        req = Requirement(line)
        if req.name.lower() == "transformers" and req.marker is None:
            parts = sorted((str(s) for s in req.specifier), key=lambda s: (not s.startswith(">"), s))
            return ",".join(parts) or None  # lower bound first: ">=5.16.1,<5.25"
    return None


def transformers_problem(version: str | None = None) -> str | None:
    """Why the installed (or the given) ``transformers`` version is unsupported, or None when it is supported."""
    if version is None:
        import transformers

        version = transformers.__version__
    return _problem(version, supported_transformers())


@functools.lru_cache(maxsize=16)
def _problem(version: str, spec: str | None) -> str | None:
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    if spec is None or SpecifierSet(spec).contains(Version(version), prereleases=True):
        return None
    return (f"transformers {version} is installed; kvpolicy supports transformers{spec} (the range it is tested "
            f"with): pip install 'transformers{spec}' (or set {ANY_VERSION_ENV}=1 to try this one anyway)")


def check_transformers() -> None:
    """Raise :class:`~kvpolicy.errors.UnsupportedModelError` when the installed transformers is out of range."""
    problem = transformers_problem()
    if problem is None:
        return
    if os.environ.get(ANY_VERSION_ENV, "") not in ("", "0"):
        warnings.warn(problem, RuntimeWarning, stacklevel=3)
        return
    raise UnsupportedModelError(problem)


def cache_arg(model: nn.Module) -> str:
    """The keyword ``model``'s ``forward()`` and ``generate()`` take a cache by: ``cache`` or ``past_key_values``."""
    params = inspect.signature(model.forward).parameters
    return "past_key_values" if "past_key_values" in params and "cache" not in params else "cache"


def cache_kwargs(model: nn.Module, cache: Any) -> dict[str, Any]:
    """``{"cache": cache}`` or ``{"past_key_values": cache}``, whichever ``model`` takes (for a plain cache)."""
    return {cache_arg(model): cache}


def _renamed(kwargs: dict[str, Any]) -> dict[str, Any]:
    if "cache" not in kwargs:
        return kwargs
    kwargs = dict(kwargs)
    cache, other = kwargs.pop("cache"), kwargs.get("past_key_values")
    if other is not None and cache is not None and other is not cache:
        raise CacheUsageError("got both cache= and past_key_values= (different objects); pass one: cache=cache")
    if other is None:
        kwargs["past_key_values"] = cache
    return kwargs


@contextmanager
def cache_keyword(model: nn.Module) -> Iterator[None]:
    """Inside the block, ``model(..., cache=c)`` and ``model.generate(..., cache=c)`` work even where this
    transformers only takes ``past_key_values`` (the keyword is renamed on the way in); nothing is changed
    where ``cache`` is already the model's keyword. On exit the model is restored exactly."""
    if cache_arg(model) == "cache":
        yield
        return

    def rename(_mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        return (args, _renamed(kwargs)) if "cache" in kwargs else None

    handle = model.register_forward_pre_hook(rename, with_kwargs=True, prepend=True)
    try:
        with wrapped_generate(model, _renamed):
            yield
    finally:
        handle.remove()


@contextmanager
def wrapped_generate(model: nn.Module, on_call: Callable[[dict[str, Any]], dict[str, Any]]) -> Iterator[None]:
    """Inside the block, ``model.generate(*args, **kwargs)`` runs ``generate(*args, **on_call(kwargs))``
    (``on_call`` may rewrite the keywords or raise). Blocks nest; on exit the model is restored exactly,
    an instance attribute ``generate`` set by someone else included."""
    own = model.__dict__.get("generate")
    inner = model.generate

    @functools.wraps(inner)
    def generate(*args: Any, **kwargs: Any) -> Any:
        return inner(*args, **on_call(kwargs))

    model.generate = generate
    try:
        yield
    finally:
        if own is not None:
            model.generate = own
        else:
            del model.generate
