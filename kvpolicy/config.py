"""Policy configuration: pydantic models, files (YAML / JSON / TOML), and :func:`load_policy`.

A config names one registered component per step and passes its parameters inline::

    name: my-text-prior
    budget: {ratio: 0.2, sink: 4, recent: 0.5}
    scorer: {name: accumulated-attention}
    prior: {name: text-prior}
    selector: {name: topk}
    merger: {name: pivotal}
    decode: {name: none}
    layers: {name: uniform}
    layer_overrides:                 # optional, per layer (negative indices count from the last layer)
      0: {budget: {ratio: 0.5}}
      -1: {scorer: knorm, merger: none}

A step may also be written as a bare name (``merger: pivotal``), the budget as a bare number
(``budget: 0.2`` is a ratio, ``budget: 512`` a token count), and the layer schedule as
``layers: {schedule: pyramid}``. Each component validates its own parameters with its pydantic model;
names are checked against the registry, with close-match hints. Every error is a
:class:`~kvpolicy.errors.ConfigError` whose message gives the field path, the bad value and what is allowed.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from torch import Tensor

from kvpolicy.errors import ConfigError, UnknownComponentError
from kvpolicy.policy import (Budget, CompressionContext, LayerBudget, Merged, Merger, Policy, Prior, Scorer,
                             Selection, Selector, run_steps)
from kvpolicy.registry import KINDS, get_registry

STEP_FIELDS = {"scorer": "scorer", "prior": "prior", "selector": "selector", "merger": "merger",
               "decode": "decode", "layers": "schedule"}
LAYER_STEP_FIELDS = ("scorer", "prior", "selector", "merger")  # steps a layer override may replace
FILE_SUFFIXES = (".yaml", ".yml", ".json", ".toml")


class StepConfig(BaseModel):
    """``{name: ..., **params}``; the params are validated by the named component."""

    model_config = ConfigDict(extra="allow")
    name: str

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


def _step_shorthand(v: Any) -> Any:
    if isinstance(v, str):
        return {"name": v}
    return v


def _budget_shorthand(v: Any) -> Any:
    if isinstance(v, bool):
        return v  # rejected by the model with a clear message
    if isinstance(v, float):
        return {"ratio": v}
    if isinstance(v, int):
        return {"tokens": v}
    return v


class LayerOverride(BaseModel):
    """Steps (and budget) that replace the policy's on one layer; absent fields are inherited.

    ``budget`` is merged into the policy's budget (``{ratio: 0.5}`` keeps the policy's sink and recent
    window); a layer with its own budget is not redistributed by the layer schedule. ``prior: null``
    removes the prior on that layer.
    """

    model_config = ConfigDict(extra="forbid")

    budget: dict[str, Any] | None = None
    scorer: StepConfig | None = None
    prior: StepConfig | None = None
    selector: StepConfig | None = None
    merger: StepConfig | None = None

    @field_validator("scorer", "prior", "selector", "merger", mode="before")
    @classmethod
    def _bare_name(cls, v: Any) -> Any:
        return _step_shorthand(v)

    @field_validator("budget", mode="before")
    @classmethod
    def _bare_budget(cls, v: Any) -> Any:
        return _budget_shorthand(v)


class PolicyConfig(BaseModel):
    """A complete policy as data."""

    model_config = ConfigDict(extra="forbid")

    name: str = "custom"
    description: str = ""
    budget: Budget
    scorer: StepConfig
    prior: StepConfig | None = None
    selector: StepConfig = Field(default_factory=lambda: StepConfig(name="topk"))
    merger: StepConfig = Field(default_factory=lambda: StepConfig(name="none"))
    decode: StepConfig = Field(default_factory=lambda: StepConfig(name="none"))
    layers: StepConfig = Field(default_factory=lambda: StepConfig(name="uniform"))
    layer_overrides: dict[int, LayerOverride] = Field(
        default_factory=dict, description="per-layer steps and budget, keyed by layer index (negative: from the end)")

    @field_validator("scorer", "prior", "selector", "merger", "decode", mode="before")
    @classmethod
    def _bare_name(cls, v: Any) -> Any:
        return _step_shorthand(v)

    @field_validator("layers", mode="before")
    @classmethod
    def _schedule_alias(cls, v: Any) -> Any:
        v = _step_shorthand(v)
        if isinstance(v, dict) and "schedule" in v and "name" not in v:
            v = {"name": v["schedule"], **{k: x for k, x in v.items() if k != "schedule"}}
        return v

    @field_validator("budget", mode="before")
    @classmethod
    def _bare_budget(cls, v: Any) -> Any:
        return _budget_shorthand(v)


def _allowed_at(loc: tuple[Any, ...]) -> tuple[str, ...] | None:
    """Field names allowed at the parent of ``loc`` (for 'extra field' errors)."""
    parent = loc[:-1]
    if parent == ():
        return tuple(PolicyConfig.model_fields)
    if parent[-1] == "budget":
        return tuple(Budget.model_fields)
    if len(parent) == 2 and parent[0] == "layer_overrides":
        return tuple(LayerOverride.model_fields)
    return None


def _short(value: Any) -> str:
    s = repr(value)
    return s if len(s) <= 80 else s[:77] + "..."


def format_validation(err: ValidationError, prefix: str = "", allowed: tuple[str, ...] | None = None) -> str:
    """One ``path: problem (got value)`` line per pydantic error."""
    lines = []
    for e in err.errors():
        loc = tuple(x for x in (prefix, *e["loc"]) if x != "")
        path = ".".join(str(x) for x in loc) or "(config)"
        msg = e["msg"].removeprefix("Value error, ")
        got = e.get("input")
        if e["type"] == "extra_forbidden":
            names = allowed if allowed is not None else _allowed_at(tuple(e["loc"]))
            msg = "unknown field" + (f"; allowed: {', '.join(names)}" if names else "")
        elif e["type"] == "missing":
            got = None
            msg = "field required"
        got_s = "" if isinstance(got, dict) or got is None else f" (got {_short(got)})"
        lines.append(f"{path}: {msg}{got_s}")
    return "\n".join(lines)


def parse_config(data: Any, source: str = "config") -> PolicyConfig:
    """Validate a mapping as a :class:`PolicyConfig` and every step against the registry."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a policy config must be a mapping, got {type(data).__name__} "
                          f"{_short(data)}")
    try:
        cfg = PolicyConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"{source}: {format_validation(err)}") from None
    build_policy(cfg, source)  # names and parameters
    return cfg


def _component(kind: str, step: StepConfig, path: str, source: str) -> Any:
    reg = get_registry()
    try:
        cls = reg.component(kind, step.name)
    except UnknownComponentError as err:
        raise UnknownComponentError(f"{source}: {path}: {err}") from None
    try:
        return cls.model_validate(step.params())
    except ValidationError as err:
        raise ConfigError(f"{source}: {format_validation(err, path, tuple(cls.model_fields))} "
                          f"[{kind} {step.name!r} takes: {_param_summary(cls)}]") from None


def _merge_budget(base: Budget, override: dict[str, Any], path: str, source: str) -> Budget:
    merged = base.model_dump(exclude_none=True)
    if "ratio" in override or "tokens" in override:
        merged.pop("ratio", None)
        merged.pop("tokens", None)
    merged.update(override)
    try:
        return Budget.model_validate(merged)
    except ValidationError as err:
        raise ConfigError(f"{source}: {format_validation(err, path, tuple(Budget.model_fields))}") from None


def build_policy(cfg: PolicyConfig, source: str = "config") -> Policy:
    """Instantiate every step of ``cfg`` from the registry."""
    steps: dict[str, Any] = {}
    for field_name, kind in STEP_FIELDS.items():
        step: StepConfig | None = getattr(cfg, field_name)
        steps[field_name] = None if step is None else _component(kind, step, field_name, source)
    common = dict(name=cfg.name, budget=cfg.budget, scorer=steps["scorer"], prior=steps["prior"],
                  selector=steps["selector"], merger=steps["merger"], decode=steps["decode"],
                  schedule=steps["layers"], description=cfg.description)
    if not cfg.layer_overrides:
        return Policy(**common)
    overrides: dict[int, LayerSteps] = {}
    for idx, ov in cfg.layer_overrides.items():
        path = f"layer_overrides.{idx}"
        ls = LayerSteps(budget=None if ov.budget is None else _merge_budget(cfg.budget, ov.budget,
                                                                             f"{path}.budget", source))
        for field_name in LAYER_STEP_FIELDS:
            step = getattr(ov, field_name)
            if step is not None:
                setattr(ls, field_name, _component(field_name, step, f"{path}.{field_name}", source))
        ls.no_prior = "prior" in ov.model_fields_set and ov.prior is None
        overrides[idx] = ls
    return LayeredPolicy(**common, overrides=overrides)


# --------------------------------------------------------------------------------------------- per layer
@dataclass
class LayerSteps:
    """The resolved override of one layer (None = inherit the policy's step)."""

    budget: Budget | None = None
    scorer: Scorer | None = None
    prior: Prior | None = None
    selector: Selector | None = None
    merger: Merger | None = None
    no_prior: bool = False

    def to_config(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.budget is not None:
            out["budget"] = self.budget.model_dump(exclude_none=True)
        for name in LAYER_STEP_FIELDS:
            step = getattr(self, name)
            if step is not None:
                out[name] = step.spec()
        if self.no_prior:
            out["prior"] = None
        return out


@dataclass
class LayeredPolicy(Policy):
    """A :class:`~kvpolicy.policy.Policy` whose steps or budget differ on some layers.

    ``overrides`` maps a layer index (negative counts from the last layer) to :class:`LayerSteps`.
    ``compress`` and ``layer_budget`` resolve the layer's steps; the decode rule and the schedule are
    the policy's (a layer with its own budget is not redistributed by the schedule).
    """

    overrides: dict[int, LayerSteps] = field(default_factory=dict)

    def _layer(self, layer_idx: int, n_layers: int) -> LayerSteps | None:
        bad = [i for i in self.overrides if not -n_layers <= i < n_layers]
        if bad:
            raise ConfigError(f"layer_overrides: layer {bad[0]} does not exist in a {n_layers}-layer model; "
                              f"allowed: {-n_layers} .. {n_layers - 1}")
        hit = self.overrides.get(layer_idx)
        return hit if hit is not None else self.overrides.get(layer_idx - n_layers)

    def steps(self) -> list[Any]:
        extra = [s for ls in self.overrides.values() for s in (ls.scorer, ls.prior, ls.selector, ls.merger)
                 if s is not None]
        return super().steps() + extra

    def layer_budgets(self, n_layers: int, n_valid: Tensor) -> list[LayerBudget]:
        out = list(super().layer_budgets(n_layers, n_valid))
        for layer_idx in range(n_layers):
            ls = self._layer(layer_idx, n_layers)
            if ls is None or ls.budget is None:
                continue
            b = ls.budget
            total = b.total(n_valid)
            lb = LayerBudget(total=total, sink=b.sink, recent=b.recent_count(total), ratio=b.ratio, seen=n_valid)
            lb.check(b, n_valid, layer_idx)
            out[layer_idx] = lb
        return out

    def compress(self, ctx: CompressionContext) -> tuple[Selection, Merged]:
        ls = self._layer(ctx.layer_idx, ctx.n_layers)
        if ls is None:
            return super().compress(ctx)
        scorer = ls.scorer or self.scorer
        prior = None if ls.no_prior else (ls.prior or self.prior)
        selector = ls.selector or self.selector
        merger = ls.merger or self.merger
        return run_steps(ctx, scorer, prior, selector, merger)

    def to_config(self) -> dict[str, Any]:
        cfg = super().to_config()
        cfg["layer_overrides"] = {i: ls.to_config() for i, ls in sorted(self.overrides.items())}
        return cfg


def _param_summary(cls: type[BaseModel]) -> str:
    fields = cls.model_fields
    if not fields:
        return "no parameters"
    def show(a: Any) -> str:
        return a.__name__ if isinstance(a, type) else str(a).replace("typing.", "")

    return ", ".join(f"{n}: {show(f.annotation)}" for n, f in fields.items())


# --------------------------------------------------------------------------------------------- files
def read_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (safe loader), JSON or TOML file into a mapping."""
    p = Path(path)
    if p.suffix.lower() not in FILE_SUFFIXES:
        raise ConfigError(f"{p}: unsupported config file type {p.suffix!r}; allowed: {', '.join(FILE_SUFFIXES)}")
    if not p.is_file():
        raise ConfigError(f"{p}: no such config file (looked in {p.resolve().parent})")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{p}: not UTF-8 text ({err.reason} at byte {err.start}); allowed: a UTF-8 "
                          f"{p.suffix[1:].upper()} file") from None
    except OSError as err:
        raise ConfigError(f"{p}: cannot read the config file ({err.strerror or err})") from None
    try:
        if p.suffix.lower() in (".yaml", ".yml"):
            data = yaml.safe_load(text)
        elif p.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            data = tomllib.loads(text)
    except (yaml.YAMLError, json.JSONDecodeError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"{p}: cannot parse {p.suffix[1:].upper()}: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: a policy config must be a mapping at the top level, got {type(data).__name__} "
                          f"{_short(data)}")
    return data


def _apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = dict(data)
    for key, value in overrides.items():
        if key == "budget":
            if isinstance(value, bool) or not isinstance(value, (int, float, dict, Budget)):
                raise ConfigError(f"budget={value!r}: give a ratio in (0, 1] (float), a token count (int) "
                                  f"or a mapping like {{'ratio': 0.2, 'sink': 4}}")
            base = _budget_shorthand(out.get("budget"))
            base = dict(base) if isinstance(base, dict) else {}
            if isinstance(value, Budget):
                out["budget"] = value.model_dump(exclude_none=True)
                continue
            value = _budget_shorthand(value)
            if "ratio" in value or "tokens" in value:
                base.pop("ratio", None)
                base.pop("tokens", None)
            out["budget"] = {**base, **value}
        elif key in PolicyConfig.model_fields:
            out[key] = value
        else:
            raise ConfigError(f"unknown override {key!r}; allowed: {', '.join(PolicyConfig.model_fields)}")
    return out


def resolve_spec(spec: Any) -> tuple[dict[str, Any], str]:
    """Turn a preset name, a file path, a mapping, a config or a policy into ``(mapping, source)``."""
    if isinstance(spec, Policy):
        return spec.to_config(), f"policy {spec.name!r}"
    if isinstance(spec, PolicyConfig):
        return spec.model_dump(exclude_none=True, exclude_unset=False), "config"
    if isinstance(spec, dict):
        return spec, "config"
    if isinstance(spec, Path):
        return read_file(spec), str(spec)
    if isinstance(spec, str):
        reg = get_registry()
        if spec in reg.presets:
            return dict(reg.preset(spec).config), f"preset {spec!r}"
        if spec.lower().endswith(FILE_SUFFIXES) or Path(spec).is_file():
            return read_file(spec), spec
        raise UnknownComponentError(reg._unknown("preset", spec, sorted(reg.presets))
                                    + " (or give a path to a .yaml/.json/.toml file)")
    raise ConfigError(f"cannot build a policy from {type(spec).__name__}; allowed: a preset name, a path to a "
                      f"YAML/JSON/TOML file, a mapping, a PolicyConfig or a Policy")


def load_config(spec: Any, **overrides: Any) -> PolicyConfig:
    """Validate ``spec`` (see :func:`load_policy`) and return it as a :class:`PolicyConfig`."""
    data, source = resolve_spec(spec)
    return parse_config(_apply_overrides(data, overrides), source)


def load_policy(spec: Any, **overrides: Any) -> Policy:
    """Build a :class:`~kvpolicy.policy.Policy`.

    Args:
        spec: a preset name (``"snapkv"``), a path to a YAML/JSON/TOML file, a mapping, a
            :class:`PolicyConfig` or a :class:`~kvpolicy.policy.Policy`.
        overrides: top-level config fields; ``budget=0.2`` sets a ratio, ``budget=512`` a token count,
            ``budget={...}`` merges into the budget.
    Raises:
        ConfigError: with the field path, the bad value and what is allowed.
    """
    data, source = resolve_spec(spec)
    cfg = parse_config(_apply_overrides(data, overrides), source)
    return build_policy(cfg, source)


def _plain_keys(data: Any) -> Any:
    """Mapping keys as strings (JSON and TOML need them; layer indices are read back as ints)."""
    if isinstance(data, dict):
        return {str(k): _plain_keys(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_plain_keys(v) for v in data]
    return data


def _null_paths(data: Any, path: str = "") -> list[str]:
    """Dotted paths of the ``None`` values in nested mappings and lists."""
    if data is None:
        return [path or "(config)"]
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    return [p for k, v in items for p in _null_paths(v, f"{path}.{k}" if path else str(k))]


def _without_default_nulls(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` without the step parameters that are None because None is their default.

    :meth:`~kvpolicy.policy.Component.spec` writes every parameter, e.g. ``quantile: null``; loading a
    config without it gives the same component, so formats without null (TOML) can leave it out.
    """
    reg = get_registry()

    def lean(spec: Any, kind: str) -> Any:
        if not isinstance(spec, dict) or (kind, spec.get("name")) not in reg.components:
            return spec
        fields = reg.component(kind, spec["name"]).model_fields
        return {k: v for k, v in spec.items()
                if not (v is None and k in fields and not fields[k].is_required() and fields[k].default is None)}

    out = {k: lean(v, STEP_FIELDS[k]) if k in STEP_FIELDS else v for k, v in data.items()}
    if isinstance(out.get("layer_overrides"), dict):
        out["layer_overrides"] = {i: {k: lean(v, k) if k in LAYER_STEP_FIELDS else v for k, v in ov.items()}
                                  for i, ov in out["layer_overrides"].items()}
    return out


def dumps_policy(policy: Policy, fmt: str = "yaml") -> str:
    """``policy`` as config text: ``fmt`` is ``"yaml"``, ``"json"`` or ``"toml"``.

    TOML has no null: step parameters that are None by default are left out (loading restores them); any
    other null (a layer override's ``prior: null``) cannot be written as TOML (ConfigError naming it).
    """
    data = policy.to_config()
    if fmt in ("yaml", "yml"):
        return yaml.safe_dump(data, sort_keys=False)
    if fmt == "json":
        return json.dumps(_plain_keys(data), indent=2)
    if fmt == "toml":
        import tomli_w

        data = _without_default_nulls(data)
        nulls = _null_paths(data)
        if nulls:
            raise ConfigError(f"TOML cannot hold null values (policy {policy.name!r} has null at "
                              f"{', '.join(nulls)}); allowed: dump this policy as YAML or JSON")
        return tomli_w.dumps(_plain_keys(data))
    raise ConfigError(f"unsupported config format {fmt!r}; allowed: yaml, json, toml")


def dump_policy(policy: Policy, path: str | Path) -> Path:
    """Write ``policy`` as a config file; the suffix picks YAML, JSON or TOML."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        raise ConfigError(f"{p}: unsupported config file type {p.suffix!r}; allowed: {', '.join(FILE_SUFFIXES)}")
    p.write_text(dumps_policy(policy, suffix[1:]), encoding="utf-8")
    return p


# --------------------------------------------------------------------------------------------- schema
def _step_schemas(kind: str, defs: dict[str, Any], nullable: bool) -> dict[str, Any]:
    reg = get_registry()
    variants = []
    for name in reg.names(kind):
        cls = reg.component(kind, name)
        sub = cls.model_json_schema()
        sub.setdefault("properties", {})
        sub["properties"] = {"name": {"const": name, "description": cls.description()}, **sub["properties"]}
        sub["required"] = ["name", *sub.get("required", [])]
        sub["additionalProperties"] = False
        sub["title"] = f"{kind} {name}"
        sub["description"] = (cls.__doc__ or "").strip()
        for k, v in sub.pop("$defs", {}).items():
            defs[k] = v
        variants.append(sub)
    entry: dict[str, Any] = {"anyOf": variants + [{"type": "string", "enum": reg.names(kind)}]}
    if nullable:
        entry["anyOf"].append({"type": "null"})
    return entry


def policy_schema() -> dict[str, Any]:
    """JSON Schema of a policy config, with every registered component's parameters.

    Each step is an ``anyOf`` of one object schema per registered component (its ``name`` is a
    ``const``, its parameters are the component's pydantic fields) or a bare name.
    """
    schema = PolicyConfig.model_json_schema()
    defs = schema.setdefault("$defs", {})
    for field_name, kind in STEP_FIELDS.items():
        schema["properties"][field_name] = _step_schemas(kind, defs, nullable=field_name == "prior")
    layer_def = defs.get("LayerOverride")
    if layer_def is not None:
        for field_name in LAYER_STEP_FIELDS:
            layer_def["properties"][field_name] = _step_schemas(field_name, defs, nullable=True)
        layer_def["properties"]["budget"] = {"anyOf": [{"$ref": "#/$defs/Budget"}, {"type": "number"},
                                                       {"type": "null"}]}
    if "Budget" not in defs:
        defs["Budget"] = Budget.model_json_schema()
    schema["properties"]["budget"] = {"anyOf": [{"$ref": "#/$defs/Budget"}, {"type": "number"}],
                                      "description": "a mapping, or a bare ratio (float) / token count (int)"}
    defs.pop("StepConfig", None)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    assert set(KINDS) >= set(STEP_FIELDS.values())
    return schema
