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

A step may also be written as a bare name (``merger: pivotal``). Each component validates its own
parameters with its pydantic model; names are checked against the registry, with close-match hints.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kvpolicy.errors import ConfigError, UnknownComponentError
from kvpolicy.policy import Budget, Policy
from kvpolicy.registry import KINDS, get_registry

STEP_FIELDS = {"scorer": "scorer", "prior": "prior", "selector": "selector", "merger": "merger",
               "decode": "decode", "layers": "schedule"}
FILE_SUFFIXES = (".yaml", ".yml", ".json", ".toml")


class StepConfig(BaseModel):
    """``{name: ..., **params}``; the params are validated by the named component."""

    model_config = ConfigDict(extra="allow")
    name: str

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


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

    @field_validator("scorer", "prior", "selector", "merger", "decode", "layers", mode="before")
    @classmethod
    def _bare_name(cls, v: Any) -> Any:
        return {"name": v} if isinstance(v, str) else v


def _format_validation(err: ValidationError, prefix: str = "") -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(x) for x in (prefix, *e["loc"]) if x != "")
        got = e.get("input")
        got_s = "" if isinstance(got, dict) else f" (got {got!r})"
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"{loc or '(config)'}: {msg}{got_s}")
    return "; ".join(lines)


def parse_config(data: Any, source: str = "config") -> PolicyConfig:
    """Validate a mapping as a :class:`PolicyConfig` and every step against the registry."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a policy config must be a mapping, got {type(data).__name__}")
    try:
        cfg = PolicyConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"{source}: {_format_validation(err)}") from None
    build_policy(cfg, source)  # names and parameters
    return cfg


def build_policy(cfg: PolicyConfig, source: str = "config") -> Policy:
    """Instantiate every step of ``cfg`` from the registry."""
    reg = get_registry()
    steps: dict[str, Any] = {}
    for field_name, kind in STEP_FIELDS.items():
        step: StepConfig | None = getattr(cfg, field_name)
        if step is None:
            steps[field_name] = None
            continue
        try:
            cls = reg.component(kind, step.name)
        except UnknownComponentError as err:
            raise UnknownComponentError(f"{source}: {field_name}: {err}") from None
        try:
            steps[field_name] = cls.model_validate(step.params())
        except ValidationError as err:
            raise ConfigError(f"{source}: {_format_validation(err, f'{field_name}')} "
                              f"[{kind} {step.name!r} takes: {_param_summary(cls)}]") from None
    return Policy(name=cfg.name, budget=cfg.budget, scorer=steps["scorer"], prior=steps["prior"],
                  selector=steps["selector"], merger=steps["merger"], decode=steps["decode"],
                  schedule=steps["layers"], description=cfg.description)


def _param_summary(cls: type[BaseModel]) -> str:
    fields = cls.model_fields
    if not fields:
        return "no parameters"
    return ", ".join(f"{n}: {f.annotation.__name__ if hasattr(f.annotation, '__name__') else f.annotation}"
                     for n, f in fields.items())


def read_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (safe loader), JSON or TOML file into a mapping."""
    p = Path(path)
    if p.suffix.lower() not in FILE_SUFFIXES:
        raise ConfigError(f"{p}: unsupported config file type {p.suffix!r}; allowed: {', '.join(FILE_SUFFIXES)}")
    if not p.is_file():
        raise ConfigError(f"{p}: no such config file")
    text = p.read_text(encoding="utf-8")
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
        raise ConfigError(f"{p}: a policy config must be a mapping at the top level, got {type(data).__name__}")
    return data


def _apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = dict(data)
    for key, value in overrides.items():
        if key == "budget":
            base = {k: v for k, v in dict(out.get("budget") or {}).items() if k not in ("ratio", "tokens")}
            if isinstance(value, bool) or not isinstance(value, (int, float, dict, Budget)):
                raise ConfigError(f"budget={value!r}: give a ratio in (0, 1] (float), a token count (int) "
                                  f"or a mapping like {{'ratio': 0.2, 'sink': 4}}")
            if isinstance(value, Budget):
                out["budget"] = value.model_dump(exclude_none=True)
            elif isinstance(value, dict):
                merged = dict(out.get("budget") or {})
                if "ratio" in value or "tokens" in value:
                    merged.pop("ratio", None)
                    merged.pop("tokens", None)
                merged.update(value)
                out["budget"] = merged
            elif isinstance(value, float):
                out["budget"] = {**base, "ratio": value}
            else:
                out["budget"] = {**base, "tokens": value}
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
        return spec.model_dump(exclude_none=True), "config"
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


def dump_policy(policy: Policy, path: str | Path) -> Path:
    """Write ``policy`` as a config file; the suffix picks YAML, JSON or TOML."""
    p = Path(path)
    data = policy.to_config()
    if p.suffix.lower() in (".yaml", ".yml"):
        p.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    elif p.suffix.lower() == ".json":
        p.write_text(json.dumps(data, indent=2), encoding="utf-8")
    elif p.suffix.lower() == ".toml":
        import tomli_w

        p.write_text(tomli_w.dumps(data), encoding="utf-8")
    else:
        raise ConfigError(f"{p}: unsupported config file type {p.suffix!r}; allowed: {', '.join(FILE_SUFFIXES)}")
    return p


def policy_schema() -> dict[str, Any]:
    """JSON Schema of a policy config, with every registered component's parameters."""
    reg = get_registry()
    schema = PolicyConfig.model_json_schema()
    defs = schema.setdefault("$defs", {})
    for field_name, kind in STEP_FIELDS.items():
        variants = []
        for name in reg.names(kind):
            cls = reg.component(kind, name)
            sub = cls.model_json_schema()
            sub.setdefault("properties", {})
            sub["properties"] = {"name": {"const": name, "description": cls.description()}, **sub["properties"]}
            sub["required"] = ["name", *sub.get("required", [])]
            sub["additionalProperties"] = False
            sub["title"] = f"{kind} {name}"
            for k, v in sub.pop("$defs", {}).items():
                defs[k] = v
            variants.append(sub)
        entry: dict[str, Any] = {"anyOf": variants + [{"type": "string", "enum": reg.names(kind)}]}
        if field_name == "prior":
            entry["anyOf"].append({"type": "null"})
        schema["properties"][field_name] = entry
    schema["$defs"].pop("StepConfig", None)
    assert set(KINDS) >= set(STEP_FIELDS.values())
    return schema
