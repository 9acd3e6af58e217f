"""One context, many questions: prefill and compress a context once, answer each question from that state.

:class:`CompressedContext` keeps a ``kvpolicy.compress`` block open on its model: the context is prefilled
and compressed once (its cost, ``prefill_seconds``, is paid once); each :meth:`~CompressedContext.ask`
rolls the cache back to the compressed context (:meth:`~kvpolicy.cache.KVPolicyCache.checkpoint`), reads
the question *without compressing it* (``cache.compressing = False``: the question is the query, as in
kvpress's pipeline) and generates greedily. An answer equals the one a fresh compression of the same
context gives for that question alone.

:func:`pipeline` is the call form people know from kvpress's ``"kv-press-text-generation"`` pipeline::

    pipe = kvpolicy.pipeline(model, tokenizer)
    pipe(context, questions=["Who?", "Where?"], policy="snapkv", budget=0.3)  # {"answers": [...], ...}

With a chat template the context and the question form one user message (``context + "\\n\\n" +
question``); the context's tokens are the rendered prompt up to the end of the context, the question's
the rest (the turn end and the assistant header included). Without one, plain text is concatenated.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch

from kvpolicy import models
from kvpolicy.errors import CacheUsageError

SEPARATOR = "\n\n"


@dataclass
class Answer:
    """One question's answer: the text, its token ids and the seconds it took (the context excluded)."""

    question: str
    text: str
    tokens: list[int] = field(default_factory=list)
    seconds: float = 0.0


def split_prompt(tokenizer: Any, context: str, question: str) -> tuple[list[int], list[int]]:
    """Token ids of the context part and the question part of the prompt for ``context`` + ``question``."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": context + SEPARATOR + question}]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        cut = prompt.index(context) + len(context)
        head, tail = prompt[:cut], prompt[cut:]
    else:
        head, tail = context, SEPARATOR + question
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    lead = [] if getattr(tokenizer, "chat_template", None) else models.leading_special(tokenizer)
    return lead + encode(head), encode(tail)


class CompressedContext:
    """A context compressed once by ``policy`` on ``model``; :meth:`ask` answers questions from it.

    Use it as a context manager (or call :meth:`close`): the model's attention is kvpolicy's while it is
    open. ``policy`` and ``overrides`` are what :func:`kvpolicy.compress` takes.
    """

    def __init__(self, model: Any, tokenizer: Any, context: str, policy: Any, **overrides: Any) -> None:
        from kvpolicy.integrate import compress

        self.model, self.tokenizer, self.context = model, tokenizer, context
        self.context_ids, _ = split_prompt(tokenizer, context, "")
        self._stack = ExitStack()
        self.cache = self._stack.enter_context(compress(model, policy, tokenizer=tokenizer, **overrides))
        ids = torch.tensor([self.context_ids], device=model.device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            model(input_ids=ids, cache=self.cache, logits_to_keep=1)  # a re-reading policy re-reads here too
        self.prefill_seconds = time.perf_counter() - t0
        self.report = self.cache.report()
        self.cache.compressing = False  # questions are read as they are
        self._state = self.cache.checkpoint()
        self._open = True

    def ask(self, question: str, *, max_new_tokens: int = 64) -> Answer:
        """Answer ``question`` (greedy) from the compressed context; the cache returns to it afterwards."""
        if not self._open:
            raise CacheUsageError("this CompressedContext is closed; create a new one")
        head, tail = split_prompt(self.tokenizer, self.context, question)
        if head != self.context_ids:
            raise CacheUsageError("the question changes how the context is tokenized; end the context with a "
                                  "space or newline, or start the question with one")
        ids = torch.tensor([head + tail], device=self.model.device)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        self.cache.rollback(self._state)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), cache=self.cache,
                                      max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
        seconds = time.perf_counter() - t0
        self.cache.rollback(self._state)
        new = out[0, ids.shape[1]:].tolist()
        return Answer(question, self.tokenizer.decode(new, skip_special_tokens=True).strip(), new, seconds)

    def close(self) -> None:
        if self._open:
            self._open = False
            self._stack.close()

    def __enter__(self) -> CompressedContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ContextPipeline:
    """``pipe(context, question=... | questions=[...], policy=..., **overrides)`` -> a dict of answers."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model, self.tokenizer = model, tokenizer

    def __call__(self, context: str, question: str | None = None, *, questions: list[str] | None = None,
                 policy: Any = "snapkv", max_new_tokens: int = 64, **overrides: Any) -> dict[str, Any]:
        if (question is None) == (questions is None):
            raise ValueError("give exactly one of question= (a string) or questions= (a list of strings)")
        asked = [question] if question is not None else list(questions or [])
        with CompressedContext(self.model, self.tokenizer, context, policy, **overrides) as ctx:
            answers = [ctx.ask(q, max_new_tokens=max_new_tokens) for q in asked]
            out: dict[str, Any] = {"report": ctx.report, "context_seconds": ctx.prefill_seconds,
                                   "seconds": [a.seconds for a in answers]}
        if question is not None:
            out["answer"] = answers[0].text
        else:
            out["answers"] = [a.text for a in answers]
        return out


def pipeline(model: Any, tokenizer: Any) -> ContextPipeline:
    """A callable in the style of kvpress's pipeline: compress a context once, answer its questions."""
    return ContextPipeline(model, tokenizer)


__all__ = ["Answer", "CompressedContext", "ContextPipeline", "pipeline", "split_prompt"]
