"""The worker side: physical slots and lengths, per-layer compaction, block-table cuts.

* ``_prepare_inputs``: positions stay logical; for a compressed request, attention lengths and the slots new
  tokens are written to are physical (kept entries plus tokens since).
* CPU attention ``forward``: after a layer's attention, for each request whose prefill ends in this step,
  read its entries out of its blocks, run the policy (:meth:`kvpolicy.serving.ServablePolicy.compress`) and
  write the kept entries into its first blocks. Under chunked prefill, the last queries of earlier chunks
  are kept for window scorers.
* ``_update_states``: before the next step's block ids are appended, the request's block-table row (and the
  request state rows are rebuilt from) is cut to the blocks the scheduler kept.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from functools import wraps
from typing import Any

import torch
from torch import Tensor

from kvpolicy.serving import ServablePolicy, parse_serve_config
from kvpolicy_vllm import hooks
from kvpolicy_vllm.layout import BlockLayout
from kvpolicy_vllm.plan import Compaction, StepPlan

log = logging.getLogger("kvpolicy.vllm")
_ACTIVE: WorkerState | None = None  # the runner whose forward is running (one per worker process)


@dataclass
class Job:
    req_id: str
    start: int  # the request's tokens in this step's flattened batch
    end: int
    first_pos: int  # logical position of its first token in this step
    block_ids: list[int]
    servable: ServablePolicy
    compaction: Compaction | None  # None: a prefill chunk, keep its last queries
    seconds: float = 0.0  # spent compressing this request, all layers


@dataclass
class WorkerState:
    n_layers: int
    layer_index: dict[str, int]
    queries: dict[tuple[str, int], tuple[Tensor, int]] = field(default_factory=dict)  # (req, layer) -> ([Q,H,D], pos0)
    cuts: dict[str, int] = field(default_factory=dict)  # req -> blocks kept, applied before the next step
    layouts: dict[tuple[Any, ...], BlockLayout] = field(default_factory=dict)
    jobs: list[Job] = field(default_factory=list)
    compacted: int = 0

    def policy(self, key: str) -> ServablePolicy:
        """The request's policy from its settings key (built once per process, see hooks.servable)."""
        return hooks.servable(parse_serve_config(key, "kvpolicy"), self.n_layers)

    def drop(self, req_ids: set[str]) -> None:
        if not req_ids:
            return
        for k in [k for k in self.queries if k[0] in req_ids]:
            del self.queries[k]
        for r in req_ids:
            self.cuts.pop(r, None)

    # --- called by the attention wrapper, once per layer
    def after_attention(self, impl: Any, layer: Any, query: Tensor, key: Tensor, value: Tensor,
                        kv_cache: Tensor) -> None:
        li = self.layer_index.get(getattr(layer, "layer_name", ""))
        if li is None:
            return
        for job in self.jobs:
            t0 = time.perf_counter()
            self._layer(job, li, impl, layer, query, key, value, kv_cache)
            job.seconds += time.perf_counter() - t0
            if li == self.n_layers - 1 and job.compaction is not None:
                c = job.compaction
                log.debug("kvpolicy: request %s: %d -> %d entries per layer and head in %.1f ms (%d layers)",
                          job.req_id, c.tokens, c.kept, 1000 * job.seconds, self.n_layers)

    def _layer(self, job: Job, li: int, impl: Any, layer: Any, query: Tensor, key: Tensor, value: Tensor,
               kv_cache: Tensor) -> None:
        w = job.servable.query_window
        q = query[job.start: job.end].reshape(job.end - job.start, impl.num_heads, impl.head_size)
        pos0 = job.first_pos
        if w:
            old = self.queries.pop((job.req_id, li), None)
            if old is not None:  # the last queries of earlier chunks end right before this chunk
                q, pos0 = torch.cat([old[0], q]), old[1]
            if q.shape[0] > w:
                q, pos0 = q[-w:], pos0 + q.shape[0] - w
        if job.compaction is None:
            if w:
                self.queries[(job.req_id, li)] = (q.detach().clone(), pos0)
            return
        c = job.compaction
        lay = self._layout(impl, layer, kv_cache)
        if key is not None and job.first_pos == 0 and job.end - job.start == c.tokens \
                and impl.kv_cache_dtype == "auto" and key.dtype == kv_cache.dtype:
            # the whole prompt came in this step: its keys and values are this step's own (what was just
            # cached, bit for bit), so nothing is read back out of the blocks
            keys = key[job.start: job.end].view(c.tokens, -1, impl.head_size).transpose(0, 1)
            values = value[job.start: job.end].view(c.tokens, -1, impl.head_size).transpose(0, 1)
        else:
            keys, values = lay.read(kv_cache, job.block_ids, c.tokens)
        qs = q.transpose(0, 1) if w else None
        qpos = torch.arange(pos0, pos0 + q.shape[0]) if w else None
        kk, vv = job.servable.compress(li, keys, values, qs, qpos, impl.scale)
        if kk.shape[1] != c.kept:
            raise RuntimeError(f"kvpolicy: layer {li} of request {job.req_id} kept {kk.shape[1]} entries, the "
                               f"scheduler planned {c.kept}")
        lay.write(layer, impl, kv_cache, job.block_ids, kk, vv)
        if li == self.n_layers - 1:
            self.cuts[job.req_id] = c.blocks
            self.compacted += 1

    def _layout(self, impl: Any, layer: Any, kv_cache: Tensor) -> BlockLayout:
        key = (tuple(kv_cache.shape[1:]), kv_cache.dtype, getattr(layer, "isa", None))
        if key not in self.layouts:
            self.layouts[key] = BlockLayout.probe(layer, impl, kv_cache)
        return self.layouts[key]


def _state(runner: Any) -> WorkerState | None:
    st = runner.__dict__.get("_kvpolicy", False)
    if st is not False:
        return st
    st = None
    if hooks.engine_settings(runner.vllm_config) is not None:
        from vllm.model_executor.layers.attention import Attention
        from vllm.model_executor.models.utils import extract_layer_index

        layers = runner.compilation_config.static_forward_context
        names = [n for n, m in layers.items() if isinstance(m, Attention)]
        st = WorkerState(n_layers=len(names), layer_index={n: extract_layer_index(n) for n in names})
    runner.__dict__["_kvpolicy"] = st
    return st


def _apply_cuts(runner: Any, st: WorkerState) -> None:
    for rid, keep in st.cuts.items():
        req = runner.requests.get(rid)
        if req is None:
            continue
        for ids in req.block_ids:
            del ids[keep:]
        row = runner.input_batch.req_id_to_index.get(rid)
        if row is not None:
            for table in runner.input_batch.block_table.block_tables:
                table.num_blocks_per_row[row] = min(int(table.num_blocks_per_row[row]), keep)
    st.cuts.clear()


def _begin_step(runner: Any, st: WorkerState, so: Any, plan: StepPlan) -> None:
    global _ACTIVE
    batch = runner.input_batch
    num_reqs = batch.num_reqs
    qsl = runner.query_start_loc.np
    if plan.offsets:
        total = so.total_num_scheduled_tokens
        shift = torch.zeros(total, dtype=runner.positions.dtype)
        for rid, d in plan.offsets.items():
            row = batch.req_id_to_index[rid]
            runner.seq_lens[row] -= d
            runner.optimistic_seq_lens_cpu[row] -= d
            shift[int(qsl[row]): int(qsl[row + 1])] = d
        physical = runner.positions[:total] - shift.to(runner.positions.device)
        batch.block_table.compute_slot_mapping(num_reqs, runner.query_start_loc.gpu[: num_reqs + 1], physical)
    jobs = []
    for rid in list(plan.observe) + list(plan.compress):
        servable = st.policy(plan.compress[rid].key if rid in plan.compress else plan.observe[rid])
        if rid not in plan.compress and not servable.query_window:
            continue  # a prefill chunk of a policy that looks at no queries: nothing to keep
        row = batch.req_id_to_index[rid]
        jobs.append(Job(req_id=rid, start=int(qsl[row]), end=int(qsl[row + 1]),
                        first_pos=int(batch.num_computed_tokens_cpu[row]), block_ids=runner.requests[rid].block_ids[0],
                        servable=servable, compaction=plan.compress.get(rid)))
    st.drop(plan.release)
    st.jobs = jobs
    _ACTIVE = st if jobs else None


def install() -> None:
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if getattr(GPUModelRunner._prepare_inputs, "_kvpolicy", False):
        return
    update_states, prepare_inputs, forward = (GPUModelRunner._update_states, GPUModelRunner._prepare_inputs,
                                              CPUAttentionBackendImpl.forward)

    @wraps(update_states)
    def _update_states(self: Any, scheduler_output: Any) -> Any:
        st = _state(self)
        if st is not None:
            _apply_cuts(self, st)
            st.drop(set(scheduler_output.finished_req_ids) | set(scheduler_output.preempted_req_ids or ()))
        return update_states(self, scheduler_output)

    @wraps(prepare_inputs)
    def _prepare_inputs(self: Any, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        global _ACTIVE
        out = prepare_inputs(self, scheduler_output, *args, **kwargs)
        _ACTIVE = None
        st = _state(self)
        plan = getattr(scheduler_output, "kvpolicy", None)
        if st is not None and plan is not None:
            _begin_step(self, st, scheduler_output, plan)
        return out

    @wraps(forward)
    def attention_forward(self: Any, layer: Any, query: Tensor, key: Tensor, value: Tensor, kv_cache: Tensor,
                          attn_metadata: Any, output: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        out = forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
        st = _ACTIVE
        if st is not None and attn_metadata is not None:
            st.after_attention(self, layer, query, key, value, kv_cache)
        return out

    _prepare_inputs._kvpolicy = True  # type: ignore[attr-defined]
    GPUModelRunner._update_states = _update_states  # type: ignore[method-assign]
    GPUModelRunner._prepare_inputs = _prepare_inputs  # type: ignore[method-assign]
    CPUAttentionBackendImpl.forward = attention_forward  # type: ignore[method-assign]
