"""The policy interface: score -> (prior) -> select -> merge, plus budget, decode rule and layer schedule.

Each step is a small pydantic model (its fields are its typed parameters) with one method. Steps are
pure functions of the tensors in a :class:`CompressionContext`; per-layer state lives in the cache.

Shapes: keys/values ``[B, Hkv, S, D]``; per-entry tensors ``[B, Hkv, S]`` (or ``[B, 1, S]`` for a
decision shared by all heads of a layer); scores are fp32, higher means more important.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor

from kvpolicy import contract, observe, ops
from kvpolicy.errors import BudgetError, ConfigError

Phase = Literal["prefill", "decode"]


# --------------------------------------------------------------------------------------------- budget
class Budget(BaseModel):
    """How many cache entries a layer keeps after compression.

    Exactly one of ``ratio`` (share of the valid tokens seen, in ``(0, 1]``) or ``tokens`` (a count).
    ``sink``: the first valid tokens, always kept. ``recent``: the last tokens, always kept, as a share
    of the budget (a float in ``[0, 1]``) or a count (an int). Sinks and the recent window are part of the
    budget, not added to it: a token budget smaller than ``sink`` (or than ``sink + recent`` for a
    count) is refused, never silently cut.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    ratio: float | None = Field(default=None, gt=0, le=1)
    tokens: int | None = Field(default=None, ge=1)
    sink: int = Field(default=4, ge=0)
    recent: int | float = Field(default=0)

    @model_validator(mode="after")
    def _check(self) -> Budget:
        if (self.ratio is None) == (self.tokens is None):
            raise ValueError(
                f"give exactly one of budget.ratio (a share in (0, 1]) or budget.tokens (a count >= 1); "
                f"got ratio={self.ratio!r}, tokens={self.tokens!r}")
        if isinstance(self.recent, float) and not 0.0 <= self.recent <= 1.0:
            raise ValueError(f"budget.recent={self.recent!r}: a share must be in [0, 1]; use an int for a count")
        if isinstance(self.recent, int) and self.recent < 0:
            raise ValueError(f"budget.recent={self.recent!r}: a token count must be >= 0")
        if self.tokens is not None and isinstance(self.recent, int) and self.recent > self.tokens:
            raise ValueError(
                f"budget.recent={self.recent} tokens is larger than the budget of {self.tokens} tokens; "
                f"allowed: 0 <= recent <= tokens")
        if self.tokens is not None and self.sink > self.tokens:
            default = "" if "sink" in self.model_fields_set else " (the default)"
            raise ValueError(
                f"budget.sink={self.sink}{default} sink tokens do not fit a budget of {self.tokens} tokens (sinks "
                f"are part of the budget); allowed: 0 <= sink <= tokens, e.g. "
                f"{{'tokens': {self.tokens}, 'sink': 0}}")
        if self.tokens is not None and isinstance(self.recent, int) and self.sink + self.recent > self.tokens:
            raise ValueError(
                f"budget.sink={self.sink} + budget.recent={self.recent} protected tokens do not fit a budget of "
                f"{self.tokens} tokens (both are part of the budget); allowed: sink + recent <= tokens")
        return self

    def describe(self) -> str:
        size = f"ratio {self.ratio}" if self.ratio is not None else f"{self.tokens} tokens"
        return f"{size}, sink {self.sink}, recent {self.recent}"

    def total(self, n_valid: Tensor) -> Tensor:
        """Entries each row keeps, ``[B]`` long, before the layer schedule (capped at ``n_valid``)."""
        if self.ratio is not None:
            t = (n_valid.double() * self.ratio).floor().long()
        else:
            t = torch.full_like(n_valid, self.tokens)
        return torch.minimum(t.clamp_min(1), n_valid)

    def recent_count(self, total: Tensor) -> Tensor:
        """Recent-window size per row for a row budget ``total`` ``[B]``."""
        if isinstance(self.recent, float):
            return (total.double() * self.recent).floor().long()
        return torch.full_like(total, self.recent)


@dataclass
class LayerBudget:
    """A budget resolved for one layer and one event: per-row totals and protected parts."""

    total: Tensor  # [B] long, entries kept per row
    sink: int
    recent: Tensor  # [B] long
    ratio: float | None = None  # the policy's budget ratio (None for a token budget)
    seen: Tensor | None = None  # [B] long, valid tokens seen per row (what ``total`` was computed from)

    def check(self, budget: Budget, n_valid: Tensor, layer_idx: int) -> None:
        compressing = self.total < n_valid
        if bool((compressing & (self.recent > self.total)).any()):
            b = int(torch.nonzero(compressing & (self.recent > self.total))[0])
            raise BudgetError(
                f"layer {layer_idx}: recent window of {int(self.recent[b])} tokens is larger than the budget of "
                f"{int(self.total[b])} entries for a {int(n_valid[b])}-token sequence ({budget.describe()}); "
                f"allowed: recent <= budget (use a share such as recent: 0.5)")


# --------------------------------------------------------------------------------------------- context
@dataclass
class CompressionContext:
    """Everything a step may look at when one layer is compressed.

    Observations (attention statistics, key norms) are computed on first request and memoised, so a
    statistic nobody asks for costs nothing.
    """

    layer_idx: int
    n_layers: int
    phase: Phase
    keys: Tensor  # [B, Hkv, S, D]
    values: Tensor  # [B, Hkv, S, D]
    positions: Tensor  # [B, Hkv, S] long, logical position of each entry
    valid: Tensor  # [B, Hkv, S] bool
    is_image: Tensor  # [B, Hkv, S] bool, entry holds a visual (image or video) token
    budget: LayerBudget
    scaling: float
    queries: Tensor | None = None  # [B, H, Q, D] post-RoPE
    query_pos: Tensor | None = None  # [B, Q] long
    query_valid: Tensor | None = None  # [B, Q] bool
    key_bias: Tensor | None = None  # [B, Hkv, S] fp32 (-inf invalid, log n merged)
    accumulated: Tensor | None = None  # [B, Hkv, S] fp32, attention accumulated before this event
    #: [B, Hkv, S] fp32 attention this event's queries gave each entry, when the attention pass computed it
    query_colsum: Tensor | None = None
    #: [B, H, Q] fp32 log-sum-exp of this event's queries' logits, when the attention kernel returned it
    query_lse: Tensor | None = None
    multiplicity: Tensor | None = None  # [B, Hkv, S] fp32, tokens each entry stands for
    #: [B, Hkv, S] fp32, max attention each entry received from the queries of a context-reconstruction
    #: pass (set only for policies whose steps return a :class:`ReconstructionPlan`, see the cache)
    reconstruction: Tensor | None = None
    #: the model's attention form at this layer (soft-capping, sinks): statistics use it, so scores are the
    #: attention the model really gives; steps computing their own attention pass it on
    form: observe.AttentionForm = observe.PLAIN
    state: dict[str, Any] = field(default_factory=dict)  # per-layer state of the policy's steps
    figures: dict[str, Any] = field(default_factory=dict)  # what the steps report (traced)
    _memo: dict[Any, Tensor] = field(default_factory=dict, repr=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        b, h, s, _ = self.keys.shape
        return b, h, s

    def _need_queries(self, what: str) -> Tensor:
        if self.queries is None or self.query_pos is None:
            raise ConfigError(
                f"{what} needs the queries of this event, which are not kept in the {self.phase} phase; "
                f"use a decode rule that keeps a query window (e.g. rolling) or a scorer that needs no queries")
        return self.queries

    def _colsum(self, q: Tensor, qpos: Tensor, qvalid: Tensor | None) -> Tensor:
        return observe.attention_colsum(q, self.keys, scaling=self.scaling, query_pos=qpos,
                                        key_pos=self.positions, key_bias=self.key_bias, query_valid=qvalid,
                                        form=self.form)

    def accumulated_attention(self, query_stride: int = 1) -> Tensor:
        """``[B, Hkv, S]``: attention each entry received from all queries so far (H2O's score).

        ``query_stride > 1`` estimates this event's share from the last 32 queries and every
        ``query_stride``-th query before them (:func:`kvpolicy.observe.estimated_colsum`): about a
        ``1/query_stride`` share of the cost of the exact statistic.
        """
        key = ("acc", query_stride)
        if key not in self._memo:
            if self.phase == "decode" and self.accumulated is not None:
                self._memo[key] = self.accumulated
                return self.accumulated
            acc = self.query_colsum if query_stride == 1 else None  # computed by the fused prefill attention
            if acc is None:
                acc = observe.estimated_colsum(
                    self._need_queries("accumulated attention"), self.keys, stride=query_stride,
                    scaling=self.scaling, query_pos=self.query_pos, key_pos=self.positions, key_bias=self.key_bias,
                    query_valid=self.query_valid, form=self.form, lse=self.query_lse)
            self._memo[key] = acc if self.accumulated is None else acc + self.accumulated
        return self._memo[key]

    def computed_accumulated(self) -> Tensor:
        """The accumulated attention this event already computed (exact first, else a step's strided
        estimate), computing the exact one only if nobody asked; the cache carries it into decoding."""
        done = sorted(k[1] for k in self._memo if isinstance(k, tuple) and k[0] == "acc")
        return self.accumulated_attention(done[0] if done else 1)

    def window_attention(self, window: int) -> Tensor:
        """``[B, Hkv, S]``: attention summed over the last ``window`` queries (SnapKV's observation)."""
        key = ("win", window)
        if key not in self._memo:
            q = self._need_queries(f"window attention (window {window})")
            w = min(window, q.shape[2])
            qv = None if self.query_valid is None else self.query_valid[:, -w:]
            self._memo[key] = self._colsum(q[:, :, -w:], self.query_pos[:, -w:], qv)
        return self._memo[key]

    def last_query_attention(self) -> Tensor:
        """``[B, Hkv, S]``: attention of the last query (TOVA's observation)."""
        return self.window_attention(1)

    def max_attention(self) -> Tensor:
        """``[B, Hkv, S]``: max attention each entry received from this event's queries (group max)."""
        if "max" not in self._memo:
            q = self._need_queries("max attention")
            self._memo["max"] = observe.attention_colmax(
                q, self.keys, scaling=self.scaling, query_pos=self.query_pos, key_pos=self.positions,
                key_bias=self.key_bias, query_valid=self.query_valid, form=self.form)
        return self._memo["max"]

    def reconstruction_attention(self) -> Tensor:
        """``[B, Hkv, S]``: max attention from the context-reconstruction pass (KVzip-style score)."""
        if self.reconstruction is None:
            raise ConfigError(
                f"reconstruction attention is only observed at the prefill of a policy whose scorer returns a "
                f"ReconstructionPlan (got phase {self.phase!r}); use decode 'none' with such a scorer")
        return self.reconstruction

    def key_norms(self) -> Tensor:
        """``[B, Hkv, S]`` fp32 key norms."""
        if "knorm" not in self._memo:
            self._memo["knorm"] = observe.key_norms(self.keys)
        return self._memo["knorm"]

    def valid_count(self) -> Tensor:
        """``[B]`` valid entries per row (all heads hold the same number)."""
        return self.valid[:, 0].sum(-1)


@dataclass
class Selection:
    """Which entries a layer keeps: ``indices [B, Hs, K]`` ascending, ``kept [B, Hs, K]`` (False = filler)."""

    indices: Tensor
    kept: Tensor
    #: ``[B, Hs, K]`` fp64 allocation keys of the slots, set by a selector whose allocation spans layers
    #: (the cache pools every layer's keys after the prefill and prunes again; see :mod:`kvpolicy.allocate`)
    key: Tensor | None = field(default=None, kw_only=True)


@dataclass
class Merged:
    """What a merger returns for the kept slots: keys/values ``[B, Hkv, K, D]``.

    ``multiplicity`` ``[B, Hkv, K]`` (tokens each entry now stands for) is set by mass-preserving
    mergers; ``bias`` ``[B, Hkv, K]`` is an additive attention logit bias the cache will apply.
    ``key_channels`` ``[B, Hkv, D']`` (ascending channel indices, ``D' < D``) asks the cache to store these
    entries' keys in those channels only (ThinK): the other channels are dropped from memory, and queries
    meet these keys in the kept channels; keys appended later keep every channel.
    """

    keys: Tensor
    values: Tensor
    merged: int = 0
    multiplicity: Tensor | None = None
    bias: Tensor | None = None
    key_channels: Tensor | None = None


# --------------------------------------------------------------------------------------------- steps
class Component(BaseModel):
    """Base of every policy step. Fields are the step's parameters (validated, JSON-Schema-exported)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: ClassVar[str] = "component"
    name: ClassVar[str] = ""
    #: observations the step asks for: "accumulated_attention", "window_attention", "key_norms", ...
    observations: ClassVar[frozenset[str]] = frozenset()
    #: properties the step promises beyond the universal ones, checked by :mod:`kvpolicy.testing`
    #: (e.g. "exact_size", "protected", "nested" for selectors; "gather", "convex", "identity_on_equal",
    #: "assign_once" for mergers; "same_total" for layer schedules)
    promises: ClassVar[frozenset[str]] = frozenset()
    #: the paper the step follows, as ``kvpolicy plugins`` shows it ("Method, Authors venue, arXiv:ID");
    #: empty for steps that follow none
    paper: ClassVar[str] = ""

    @classmethod
    def description(cls) -> str:
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    def spec(self) -> dict[str, Any]:
        """``{"name": ..., **params}``, the form used in config files."""
        return {"name": self.name, **self.model_dump(mode="json")}


class Scorer(Component):
    """Importance of every entry of a layer."""

    kind: ClassVar[str] = "scorer"
    #: scores on one scale across heads and layers (attention masses), so an adaptive allocation may pool
    #: them (:mod:`kvpolicy.allocate`); False for norms, ranks and other per-head scales
    comparable: ClassVar[bool] = False

    def score(self, ctx: CompressionContext) -> Tensor:
        """Return ``[B, Hkv or 1, S]`` fp32 scores, higher = keep."""
        raise NotImplementedError


class Prior(Component):
    """A priority class per entry, ranked before the score (e.g. LOOK-M's text prior)."""

    kind: ClassVar[str] = "prior"

    def priority(self, ctx: CompressionContext) -> Tensor:
        """Return ``[B, Hkv or 1, S]`` integer-valued priorities (higher is kept first)."""
        raise NotImplementedError


class Selector(Component):
    """Which entries to keep under the layer budget."""

    kind: ClassVar[str] = "selector"

    def select(self, ctx: CompressionContext, scores: Tensor, priority: Tensor | None) -> Selection:
        raise NotImplementedError

    def spans_layers(self) -> bool:
        """True for a selection that is the first of two stages: each layer keeps a superset with its
        ``Selection.key`` at prefill, then the cache pools every layer and keeps :meth:`pool_counts`."""
        return False

    def pool_counts(self, keys: Tensor, valid: Tensor, share: Tensor) -> Tensor:
        """Second stage: entries per group ``[B, G]`` from the pooled keys ``[B, G, S]`` of every (layer, KV
        head) group, given each group's uniform share ``share [B, G]`` (the counts add up to its row sum)."""
        raise NotImplementedError(f"selector {self.name!r} does not pool layers")


class Merger(Component):
    """Folds evicted entries into kept ones (or just gathers the kept ones)."""

    kind: ClassVar[str] = "merger"
    #: the merger may return ``Merged.key_channels`` (keys stored in some channels only): one compression per
    #: context, so decode rules that compact and layer pooling are refused with it
    thins_keys: ClassVar[bool] = False

    def merge(self, ctx: CompressionContext, selection: Selection, scores: Tensor) -> Merged:
        raise NotImplementedError


@dataclass(frozen=True)
class ReconstructionPlan:
    """A deferred prefill observation: after the prefill forward, the model re-reads its context.

    The cache does not compress at the prefill; a forward post-hook (:mod:`kvpolicy.integrate`) feeds
    ``prompt`` then the context tokens again (teacher-forced), ``chunk`` context tokens per forward, every
    ``stride``-th chunk only, at most ``tokens`` of each chunk (None = all), in an observe-only mode that
    records per layer the max attention each context entry receives and then drops the new entries;
    then every layer is compressed with :attr:`CompressionContext.reconstruction` set.
    """

    prompt: str
    chunk: int = 512
    stride: int = 1
    tokens: int | None = None


@dataclass
class DecodeView:
    """What a decode rule sees before a new token is appended to a layer."""

    layer_idx: int
    n_layers: int
    n_seen: int  # logical tokens seen before this forward
    length: int  # physical slots now (a ragged layer: its longest head; KeepIndices index these slots)
    target: int  # entries the policy's budget allows at ``n_seen`` (max over rows)
    state: dict[str, Any]
    budget: LayerBudget | None = None  # the layer budget ``target`` comes from (ratio, sink, per-row seen)
    entries: int | None = None  # entries per KV head, the mean over the heads (None: ``length``)


@dataclass
class Compact:
    """Decode action: run the policy's score/select/merge to shrink the layer to its budget."""


@dataclass
class KeepIndices:
    """Decode action: keep these physical entries ``[B, Hs, K]`` (ascending), drop the rest.

    ``kept [B, Hs, K]`` (optional, default all True) marks filler slots (False): a row that must keep
    its length while another row of the batch drops an entry gets an invalid slot there instead.
    """

    indices: Tensor
    event: str = "decode"
    kept: Tensor | None = None


class DecodeRule(Component):
    """What happens to a compressed layer while tokens are generated."""

    kind: ClassVar[str] = "decode"
    #: maintain accumulated attention of decode queries (when the scorer asks for it)
    compacts: ClassVar[bool] = False
    #: recent queries kept per layer for decode-time window observations
    query_window: int = 0

    def on_prefill(self, view: DecodeView) -> None:
        """Called after a layer was compressed at prefill; may store state in ``view.state``."""

    def on_decode(self, view: DecodeView) -> Compact | KeepIndices | None:
        return None


class LayerSchedule(Component):
    """Distribution of the average budget over layers."""

    kind: ClassVar[str] = "schedule"

    def layer_total(self, avg_total: Tensor, recent: Tensor, layer_idx: int, n_layers: int, *,
                    n_valid: Tensor | None = None) -> Tensor:
        """Share of layer ``layer_idx`` per row ``[B]`` (real-valued or integer) given the uniform budget
        ``avg_total [B]`` and the rows' valid lengths ``n_valid [B]``; :meth:`Policy.layer_budgets` caps,
        redistributes and rounds the shares so the layers keep ``n_layers * avg_total`` in all."""
        return avg_total


# --------------------------------------------------------------------------------------------- policy
@dataclass
class Policy:
    """A complete compression policy. Build one with :func:`kvpolicy.load_policy`."""

    name: str
    budget: Budget
    scorer: Scorer
    selector: Selector
    merger: Merger
    decode: DecodeRule
    schedule: LayerSchedule
    prior: Prior | None = None
    description: str = ""
    _budget_memo: dict[Any, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_composition(self)

    def steps(self) -> list[Component]:
        return [s for s in (self.scorer, self.prior, self.selector, self.merger, self.decode, self.schedule)
                if s is not None]

    @property
    def observations(self) -> frozenset[str]:
        out: frozenset[str] = frozenset()
        for s in self.steps():
            out |= s.observations
        return out

    def layer_budget(self, layer_idx: int, n_layers: int, n_valid: Tensor) -> LayerBudget:
        """Resolve the budget of ``layer_idx`` for rows holding ``n_valid`` ``[B]`` valid tokens."""
        return self.layer_budgets(n_layers, n_valid)[layer_idx]

    def layer_budgets(self, n_layers: int, n_valid: Tensor) -> list[LayerBudget]:
        """The budgets of all ``n_layers`` layers for rows holding ``n_valid`` ``[B]`` valid tokens.

        The schedule's shares are capped at ``n_valid`` (a layer cannot keep more than it holds); what a
        capped layer cannot use goes to the others, and the rounding remainder to the layers with the
        largest fractional share (ties to the lower layer), so the layers keep exactly ``n_layers`` times
        the uniform budget per row (less only where every layer keeps everything).
        """
        owner = self._budget_memo.get("owner")
        if owner is None or owner[0] is not self.budget or owner[1] is not self.schedule:
            self._budget_memo.clear()  # the policy's budget or schedule was replaced since
            self._budget_memo["owner"] = (self.budget, self.schedule)
        key = (n_layers, tuple(int(x) for x in n_valid.reshape(-1)))
        hit = self._budget_memo.get(key)
        if hit is not None:
            return hit
        avg = self.budget.total(n_valid)
        recent = self.budget.recent_count(avg)
        raw = torch.stack([self.schedule.layer_total(avg, recent, i, n_layers, n_valid=n_valid).double()
                           for i in range(n_layers)])  # [n_layers, B]
        totals = torch.stack([fit_total(raw[:, b], int(n_valid[b]), int(avg[b]) * n_layers)
                              for b in range(n_valid.numel())], dim=1) if n_valid.numel() else raw.long()
        out = []
        for i in range(n_layers):
            total = torch.minimum(totals[i].clamp_min(1), n_valid)
            total = torch.where(avg >= n_valid, n_valid, total)  # budget >= length: no layer compresses
            rec = self.budget.recent_count(total) if isinstance(self.budget.recent, float) else recent
            lb = LayerBudget(total=total, sink=self.budget.sink, recent=rec, ratio=self.budget.ratio, seen=n_valid)
            lb.check(self.budget, n_valid, i)
            out.append(lb)
        if len(self._budget_memo) > 64:
            self._budget_memo.clear()
            self._budget_memo["owner"] = (self.budget, self.schedule)
        self._budget_memo[key] = out
        return out

    def reconstruction(self) -> ReconstructionPlan | None:
        """The plan of the first step that defines ``reconstruction_plan()`` (deferred prefill), or None."""
        for step in self.steps():
            plan_fn = getattr(step, "reconstruction_plan", None)
            if plan_fn is not None:
                return plan_fn()
        return None

    def compress(self, ctx: CompressionContext) -> tuple[Selection, Merged]:
        """Run score -> prior -> select -> merge on one layer."""
        return run_steps(ctx, self.scorer, self.prior, self.selector, self.merger)

    def to_config(self) -> dict[str, Any]:
        """The policy as a config mapping (``load_policy(policy.to_config())`` rebuilds it)."""
        cfg: dict[str, Any] = {
            "name": self.name,
            "budget": self.budget.model_dump(exclude_none=True),
            "scorer": self.scorer.spec(),
            "selector": self.selector.spec(),
            "merger": self.merger.spec(),
            "decode": self.decode.spec(),
            "layers": self.schedule.spec(),
        }
        if self.description:
            cfg["description"] = self.description
        if self.prior is not None:
            cfg["prior"] = self.prior.spec()
        return cfg


def check_composition(policy: Policy) -> None:
    """Refuse step combinations that cannot work together, naming what would."""
    sel, scorer = policy.selector, policy.scorer
    if getattr(sel, "needs_comparable", False) and not scorer.comparable:
        from kvpolicy.registry import get_registry

        reg = get_registry()
        ok = [n for n in reg.names("scorer") if getattr(reg.component("scorer", n), "comparable", False)]
        raise ConfigError(
            f"policy {policy.name!r}: selector {sel.name!r} pools scores across heads or layers, but scorer "
            f"{scorer.name!r} does not give scores on one scale across them; allowed scorers: {', '.join(ok)} "
            f"(or the 'topk' selector, which ranks each head alone)")
    thinning = [s for s in policy.steps() if getattr(s, "thins_keys", False)]
    if thinning and (policy.decode.compacts or sel.spans_layers()):
        what = f"decode rule {policy.decode.name!r} compacts" if policy.decode.compacts else \
            f"selector {sel.name!r} pools the layers after the prefill"
        raise ConfigError(
            f"policy {policy.name!r}: merger {thinning[0].name!r} stores the kept keys in fewer channels once, but "
            f"{what} (a second compression of thinned keys); allowed: decode 'none' and a selector that decides "
            f"each layer at its prefill")
    if sel.spans_layers() and policy.decode.compacts:
        raise ConfigError(
            f"policy {policy.name!r}: selector {sel.name!r} pools every layer after the prefill, which a decode "
            f"rule that compacts one layer at a time ({policy.decode.name!r}) cannot do; allowed: decode 'none', "
            f"or the selector with scope 'heads'")


def run_steps(ctx: CompressionContext, scorer: Scorer, prior: Prior | None, selector: Selector, merger: Merger
              ) -> tuple[Selection, Merged]:
    """score -> prior -> select -> merge on one layer, each step's output checked against its contract
    (:mod:`kvpolicy.contract`) before the next step sees it."""
    scores = contract.check_scores(scorer, ctx, scorer.score(ctx))
    priority = contract.check_priority(prior, ctx, prior.priority(ctx)) if prior is not None else None
    selection = selector.select(ctx, scores, priority)
    contract.check_selection(selector, ctx, selection)
    merged = merger.merge(ctx, selection, scores)
    contract.check_merged(merger, ctx, selection, merged)
    return selection, merged


def fit_total(raw: Tensor, cap: int, target: int) -> Tensor:
    """Integer layer budgets ``[n_layers]`` from real-valued shares ``raw`` that add up to ``target``.

    Each layer holds at most ``cap`` (the row's valid tokens) and at least 1; what a capped layer cannot
    hold is spread evenly over the uncapped ones (repeatedly, as they reach the cap), then the rounding
    remainder goes to the largest fractional parts (ties to the lower layer). ``target`` above
    ``n_layers * cap`` gives every layer ``cap``.
    """
    n = raw.numel()
    x = raw.double().clamp(1.0, float(cap))
    target = min(target, n * cap)
    for _ in range(n):
        short = target - float(x.sum())
        free = x < cap
        if short <= 1e-9 or not bool(free.any()):
            break
        x = torch.where(free, x + short / int(free.sum()), x).clamp(max=float(cap))
    out = x.floor().long()
    left = target - int(out.sum())
    if left > 0:
        frac = torch.where(out < cap, x - out.double(), torch.full_like(x, -1.0))
        order = torch.sort(frac, descending=True, stable=True).indices
        out[order[:left]] += 1
    return out


def gather_kept(ctx: CompressionContext, selection: Selection) -> tuple[Tensor, Tensor]:
    """Keys and values of the kept slots, ``[B, Hkv, K, D]`` each (shared helper for mergers)."""
    return ops.gather_seq(ctx.keys, selection.indices), ops.gather_seq(ctx.values, selection.indices)


def evicted_indices(ctx: CompressionContext, selection: Selection) -> tuple[Tensor, Tensor]:
    """Indices of the valid entries not kept, ``[B, Hkv, E]``, and their validity mask ``[B, Hkv, E]``.

    ``E`` is the largest evicted count over rows; shorter rows are padded with invalid slots.
    """
    b, h, s = ctx.shape
    idx = ops.expand_heads(selection.indices, h)
    kept_mask = torch.zeros(b, h, s, dtype=torch.bool, device=ctx.keys.device)
    kept_mask.scatter_(2, idx, ops.expand_heads(selection.kept, h))
    ev = ctx.valid & ~kept_mask
    n = int(ev.sum(-1).max()) if ev.numel() else 0
    order = torch.sort(ev.to(torch.int8), dim=-1, descending=True, stable=True).indices[..., :n]
    return order, ev.gather(-1, order)


def log_or_none(mult: Tensor | None) -> Tensor | None:
    """``log(multiplicity)`` as an attention bias, or None when every entry stands for one token."""
    if mult is None or bool((mult == 1).all()):
        return None
    return mult.clamp_min(1e-30).log()


__all__ = [
    "Budget", "LayerBudget", "CompressionContext", "Selection", "Merged", "Component", "Scorer", "Prior",
    "Selector", "Merger", "DecodeRule", "DecodeView", "Compact", "KeepIndices", "LayerSchedule", "Policy",
    "ReconstructionPlan",
    "gather_kept", "evicted_indices", "log_or_none", "fit_total", "run_steps", "check_composition",
]
