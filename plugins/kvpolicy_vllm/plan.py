"""What the scheduler tells the worker each step (pickled with vLLM's ``SchedulerOutput``). No vLLM imports."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Compaction:
    """Compress request ``req_id`` after this step's forward: ``tokens`` entries -> ``kept``, keep ``blocks``."""

    key: str  # ServeConfig.key() of the request's settings
    tokens: int
    kept: int
    blocks: int


@dataclass
class StepPlan:
    """kvpolicy's part of one scheduler step."""

    #: logical minus physical length of every scheduled compressed request (positions stay logical)
    offsets: dict[str, int] = field(default_factory=dict)
    #: requests whose prompt is still being prefilled in chunks: keep their last queries (settings key)
    observe: dict[str, str] = field(default_factory=dict)
    #: requests whose prefill ends in this step and that compress
    compress: dict[str, Compaction] = field(default_factory=dict)
    #: requests whose prefill ended in this step without compressing (shorter than their budget)
    release: set[str] = field(default_factory=set)
