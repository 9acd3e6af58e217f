"""The scheduler: compressed requests hold ``ceil((kept + generated) / block_size)`` blocks.

``num_computed_tokens`` stays logical (it drives positions, the tokens still to run and the output
bookkeeping); the KV-block allocation of a compressed request is sized on its physical length (kept entries
plus tokens since), and its tail blocks go back to the pool once the worker has compacted it. Each step's
:class:`~kvpolicy_vllm.plan.StepPlan` rides to the worker on the ``SchedulerOutput``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import wraps
from typing import Any

from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import RequestStatus

from kvpolicy.serving import ServablePolicy, ServeConfig
from kvpolicy_vllm import hooks
from kvpolicy_vllm.plan import Compaction, StepPlan

log = logging.getLogger("kvpolicy.vllm")
_ADMITTING = (RequestStatus.WAITING, RequestStatus.PREEMPTED)


@dataclass
class RequestState:
    settings: ServeConfig
    servable: ServablePolicy
    offset: int = 0  # logical minus physical length
    done: bool = False  # compressed (or found too short) since its blocks were last allocated from scratch
    pending: Compaction | None = None  # compaction sent to the worker, blocks not yet given back


@dataclass
class Stats:
    """What the integration did (read them with ``KVPolicyScheduler.stats`` or the engine log)."""

    compressed: int = 0
    tokens_in: int = 0
    tokens_kept: int = 0
    blocks_freed: int = 0
    peak_blocks_in_use: int = 0
    peak_running: int = 0
    preempted: int = 0  # preemptions of any request (compressed ones are recomputed and compressed again)
    events: list[tuple[str, int, int, int]] = field(default_factory=list)  # (request, tokens, kept, freed)


def prompt_blocks_of(request: Any, block_size: int) -> int:
    """Blocks a request's whole prompt takes (uncompressed)."""
    return -(-request.num_prompt_tokens // block_size)


class KVPolicyScheduler(Scheduler):
    """vLLM's scheduler, with compressed requests' KV blocks sized on their physical length."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.kv_default = hooks.engine_settings(self.vllm_config) or ServeConfig(enabled=False)
        self.kv_layers = hooks.n_layers_of(self.vllm_config)
        self.kv_state: dict[str, RequestState] = {}
        self.kv_stats = Stats()
        managers = self.kv_cache_manager.coordinator.single_type_managers
        if len(managers) != 1:
            raise RuntimeError(f"kvpolicy: {len(managers)} KV-cache groups; compression serves one group (every "
                               f"layer full attention)")
        self.kv_manager = managers[0]
        self.kv_block_size = self.kv_manager.block_size
        self._wrap_allocation()

    # --- the KV-cache manager sees physical lengths, and never caches a compressed request's blocks
    def _wrap_allocation(self) -> None:
        mgr, state = self.kv_cache_manager, self.kv_state
        allocate, cache = mgr.allocate_slots, mgr.coordinator.cache_blocks

        @wraps(allocate)
        def allocate_slots(request: Any, *args: Any, **kwargs: Any) -> Any:
            st = state.get(request.request_id)
            if st is not None and st.settings.admission == "reserve" and request.status in _ADMITTING:
                new_tokens = args[0] if args else kwargs.get("num_new_tokens", 0)
                kwargs["reserved_blocks"] = kwargs.get("reserved_blocks", 0) + self._growth_reserve(request, new_tokens)
            d = st.offset if st is not None else 0
            if not d:
                return allocate(request, *args, **kwargs)
            request.num_computed_tokens -= d
            try:
                return allocate(request, *args, **kwargs)
            finally:
                request.num_computed_tokens += d

        @wraps(cache)
        def cache_blocks(request: Any, *args: Any, **kwargs: Any) -> Any:
            if request.request_id in state:
                return None  # compacted in place: its blocks must never be shared
            return cache(request, *args, **kwargs)

        mgr.allocate_slots = allocate_slots
        mgr.coordinator.cache_blocks = cache_blocks

    # --- admission: a compressed request starts only if the compressed requests running can still grow
    def _grown_blocks(self, request: Any, st: RequestState) -> int:
        """Blocks ``request`` holds once compressed and done: its kept entries plus every output token."""
        return -(-(st.servable.kept(request.num_prompt_tokens) + request.max_tokens) // self.kv_block_size)

    def _growth_reserve(self, request: Any, num_new_tokens: int) -> int:
        """Free blocks that must stay free when ``request`` (waiting, compressed) is given blocks for its next
        ``num_new_tokens`` tokens.

        Two conditions, over the compressed requests running (``r``) and the request itself:

        * in the long run, every one at its largest once compressed (kept entries + every output token) fits:
          ``sum final_r + final <= held + free``; the prompt's own blocks beyond its compressed size come back
          after its prefill, so they are not counted twice;
        * while its prompt is prefilled (the steps its remaining prompt takes, plus the one that compacts it),
          the blocks the running ones take meanwhile (one token per step each; a prompt still prefilling: all
          its prompt) and the rest of its own prompt stay free.

        Admitting a compressed request into blocks that running ones will need makes vLLM preempt one later (a
        preempted request is prefilled and compressed again from scratch); holding them back keeps every
        admitted request running to its end. Nothing running: nothing to protect (a request too long for the
        pool is left to vLLM, as without kvpolicy)."""
        if not self.running:
            return 0
        bs = self.kv_block_size
        held_now = -(-(request.num_computed_tokens + num_new_tokens) // bs)  # what this allocation holds
        prompt_blocks = prompt_blocks_of(request, bs)
        left = max(0, request.num_prompt_tokens - request.num_computed_tokens - num_new_tokens)
        steps = -(-left // max(1, self.max_num_scheduled_tokens)) + 2  # its prefill, then its compaction
        long_run = self._grown_blocks(request, self.kv_state[request.request_id]) - held_now
        short_run = max(0, prompt_blocks - held_now)
        for r in self.running:
            st = self.kv_state.get(r.request_id)
            if st is None:
                continue
            held = len(self.kv_manager.req_to_blocks.get(r.request_id, ()))
            final = self._grown_blocks(r, st)
            long_run += final - held
            if st.offset:  # compressed: grows by a token per step
                soon = min(final, -(-(r.num_tokens - st.offset + steps) // bs))
            else:  # still prefilling (or too short to compress): its whole prompt, then a token per step
                soon = max(prompt_blocks_of(r, bs), min(final, -(-(r.num_tokens + steps) // bs)))
            short_run += max(0, soon - held)
        return max(0, long_run, short_run)

    # --- request life cycle
    def add_request(self, request: Any) -> None:
        params = getattr(request, "sampling_params", None)
        if params is not None:
            settings = hooks.request_settings(params, self.kv_default)
            if settings.enabled:
                self.kv_state[request.request_id] = RequestState(settings, hooks.servable(settings, self.kv_layers))
                request.skip_reading_prefix_cache = True
        super().add_request(request)

    def _preempt_request(self, request: Any, *args: Any, **kwargs: Any) -> None:
        self.kv_stats.preempted += 1
        st = self.kv_state.get(request.request_id)
        if st is not None:  # recomputed from scratch: it will be prefilled and compressed again
            st.offset, st.done, st.pending = 0, False, None
        super()._preempt_request(request, *args, **kwargs)

    def _free_request(self, request: Any, *args: Any, **kwargs: Any) -> Any:
        self.kv_state.pop(request.request_id, None)
        return super()._free_request(request, *args, **kwargs)

    # --- each step
    def schedule(self, *args: Any, **kwargs: Any) -> Any:
        out = super().schedule(*args, **kwargs)
        plan = StepPlan()
        for rid in out.num_scheduled_tokens:
            st = self.kv_state.get(rid)
            if st is None:
                continue
            if st.offset:
                plan.offsets[rid] = st.offset
            if st.done:
                continue
            req = self.requests[rid]
            key = st.settings.key()
            if req.is_prefill_chunk:
                plan.observe[rid] = key
                continue
            st.done = True
            n = req.num_computed_tokens  # entries in the cache once this step has run
            kept = st.servable.kept(n)
            if kept >= n:
                plan.release.add(rid)
                continue
            st.pending = plan.compress[rid] = Compaction(key=key, tokens=n, kept=kept,
                                                         blocks=-(-kept // self.kv_block_size))
        out.kvpolicy = plan
        used = self.kv_cache_manager.block_pool.num_gpu_blocks - self.kv_cache_manager.block_pool.get_num_free_blocks()
        self.kv_stats.peak_blocks_in_use = max(self.kv_stats.peak_blocks_in_use, used)
        self.kv_stats.peak_running = max(self.kv_stats.peak_running, len(self.running))
        return out

    def update_from_output(self, scheduler_output: Any, model_runner_output: Any) -> Any:
        result = super().update_from_output(scheduler_output, model_runner_output)
        plan: StepPlan | None = getattr(scheduler_output, "kvpolicy", None)
        for rid, job in (plan.compress if plan is not None else {}).items():
            st, req = self.kv_state.get(rid), self.requests.get(rid)
            if st is None or req is None or st.pending is not job:
                continue  # finished (blocks already freed) or preempted since
            st.pending = None
            st.offset = job.tokens - job.kept
            self.kv_stats.compressed += 1
            self.kv_stats.tokens_in += job.tokens
            self.kv_stats.tokens_kept += job.kept
            self.kv_stats.blocks_freed += self._give_back(rid, job.blocks)
            self.kv_stats.events.append((rid, job.tokens, job.kept, self.kv_stats.blocks_freed))
        return result

    def _give_back(self, rid: str, keep: int) -> int:
        """Return the request's blocks after the first ``keep`` to the pool; how many went back."""
        blocks = self.kv_manager.req_to_blocks.get(rid)
        if not blocks or len(blocks) <= keep:
            return 0
        tail = blocks[keep:]
        del blocks[keep:]
        self.kv_cache_manager.block_pool.free_blocks(reversed(tail))
        return len(tail)

    @property
    def stats(self) -> Stats:
        return self.kv_stats
