"""Where kvpolicy attaches to vLLM 0.32: the engine's config, the request check, the scheduler, the worker.

* Front end (``EngineArgs.create_engine_config``): the engine's ``additional_config["kvpolicy"]`` is parsed
  and checked (:func:`kvpolicy.serving.check_servable`) before any process starts, the engine features
  the integration cannot serve are refused, and the scheduler class is set to
  :class:`kvpolicy_vllm.scheduler.KVPolicyScheduler`.
* Front end (``InputProcessor._validate_params``): a request's ``extra_args["kvpolicy"]`` is checked when it
  arrives; a bad one is refused with kvpolicy's message (a 400 from the OpenAI server).
* Worker: the model runner's ``_update_states`` / ``_prepare_inputs`` and the CPU attention's ``forward``
  are wrapped (:mod:`kvpolicy_vllm.worker`); they do nothing for an engine without kvpolicy.
"""

from __future__ import annotations

import json
import logging
from functools import wraps
from typing import Any

from kvpolicy.errors import ConfigError
from kvpolicy.serving import CONFIG_KEY, RUNS_INSTEAD, ServablePolicy, ServeConfig, check_servable, parse_serve_config

log = logging.getLogger("kvpolicy.vllm")
SCHEDULER = "kvpolicy_vllm.scheduler.KVPolicyScheduler"
_servable: dict[tuple[str, int], ServablePolicy] = {}


def engine_settings(vllm_config: Any) -> ServeConfig | None:
    """The engine's kvpolicy settings, or None when the engine was started without them."""
    extra = getattr(vllm_config, "additional_config", None) or {}
    if not isinstance(extra, dict) or CONFIG_KEY not in extra:
        return None
    return parse_serve_config(extra[CONFIG_KEY], f"additional_config[{CONFIG_KEY!r}]")


def n_layers_of(vllm_config: Any) -> int:
    return int(vllm_config.model_config.get_num_layers(vllm_config.parallel_config))


def servable(config: ServeConfig, n_layers: int, where: str = "kvpolicy") -> ServablePolicy:
    """:func:`check_servable`, once per distinct settings (the last 256 kept: requests may each bring their own)."""
    key = (config.key(), n_layers)
    if key not in _servable:
        if len(_servable) >= 256:
            _servable.pop(next(iter(_servable)))
        _servable[key] = check_servable(config, n_layers, where)
    return _servable[key]


def request_settings(params: Any, default: ServeConfig) -> ServeConfig:
    """A request's settings: its ``extra_args["kvpolicy"]`` over the engine's (a mapping merges into them)."""
    extra = getattr(params, "extra_args", None) or {}
    if CONFIG_KEY not in extra:
        return default
    own = extra[CONFIG_KEY]
    where = f"SamplingParams.extra_args[{CONFIG_KEY!r}]"
    if isinstance(own, str) and own.strip().startswith("{"):  # the OpenAI server's vllm_xargs carry a JSON string
        try:
            own = json.loads(own)
        except json.JSONDecodeError:
            pass  # parse_serve_config names the error
    if isinstance(own, dict) and default.enabled:
        base = default.model_dump(exclude_defaults=False)
        own = {**base, **own}
    return parse_serve_config(own, where)


def check_engine(vllm_config: Any) -> ServeConfig | None:
    """Refuse, with kvpolicy's message, an engine whose kvpolicy settings or features cannot be served."""
    settings = engine_settings(vllm_config)
    if settings is None:
        return None
    where = f"additional_config[{CONFIG_KEY!r}]"
    n_layers = n_layers_of(vllm_config)
    if settings.enabled:
        servable(settings, n_layers, where)

    def refuse(what: str, fix: str) -> None:
        raise ConfigError(f"kvpolicy in vLLM: {what} is not supported with compression; {fix}")

    sched, cache, par = vllm_config.scheduler_config, vllm_config.cache_config, vllm_config.parallel_config
    if vllm_config.speculative_config is not None:
        refuse("speculative decoding", "start the engine without speculative_config")
    if getattr(par, "pipeline_parallel_size", 1) > 1:
        refuse("pipeline parallelism", "use pipeline_parallel_size=1")
    if getattr(par, "tensor_parallel_size", 1) > 1 or getattr(par, "data_parallel_size", 1) > 1:
        refuse("tensor/data parallelism (not built or measured yet)", "use one worker")
    if str(cache.cache_dtype) not in ("auto", "float32", "bfloat16", "float16", "half", "float"):
        refuse(f"kv_cache_dtype={cache.cache_dtype!r}", "use kv_cache_dtype='auto'")
    if getattr(sched, "async_scheduling", False):
        refuse("async scheduling (step N+1 is scheduled before step N's compaction is known)",
               "pass async_scheduling=False")
    if getattr(vllm_config.model_config, "is_multimodal_model", False):
        refuse("a multimodal model (visual tokens in vLLM are not tracked yet)", "serve a text-only model")
    hf = vllm_config.model_config.hf_text_config
    kinds = set(getattr(hf, "layer_types", None) or ["full_attention"])
    if getattr(hf, "sliding_window", None) or kinds != {"full_attention"}:
        refuse(f"a model with sliding-window or mixed layers ({sorted(kinds)})", "serve a model whose layers all use "
               "full attention (e.g. Llama, Qwen2)")
    if sched.scheduler_cls not in (None, SCHEDULER):
        refuse(f"scheduler_cls={sched.scheduler_cls!r} (kvpolicy brings its own scheduler)", "leave scheduler_cls unset")
    sched.scheduler_cls = SCHEDULER
    if settings.enabled:
        p = servable(settings, n_layers).policy
        log.warning("kvpolicy: compressing every request's prompt with policy %r (%s); compressed requests neither "
                    "read nor write the prefix cache (prefix caching stays on for requests that switch kvpolicy "
                    "off)", p.name, p.budget.describe())
    else:
        log.warning("kvpolicy: enabled per request only (engine default: off)")
    return settings


def _wrap_create_engine_config() -> None:
    from vllm.engine.arg_utils import EngineArgs

    orig = EngineArgs.create_engine_config
    if getattr(orig, "_kvpolicy", False):
        return

    @wraps(orig)
    def create_engine_config(self: Any, *args: Any, **kwargs: Any) -> Any:
        cfg = orig(self, *args, **kwargs)
        check_engine(cfg)
        return cfg

    create_engine_config._kvpolicy = True  # type: ignore[attr-defined]
    EngineArgs.create_engine_config = create_engine_config  # type: ignore[method-assign]


def refused_request_error() -> type[ConfigError]:
    """kvpolicy's :class:`ConfigError` that is also vLLM's ``VLLMValidationError``: the OpenAI server answers it
    with 400 and kvpolicy's message (a plain ValueError from the async engine becomes an empty 500)."""
    global _RequestRefused
    if _RequestRefused is None:
        from vllm.exceptions import VLLMValidationError

        class RequestRefused(ConfigError, VLLMValidationError):
            def __init__(self, message: str) -> None:
                VLLMValidationError.__init__(self, message, parameter=f"extra_args.{CONFIG_KEY}")

            def __str__(self) -> str:
                return str(self.args[0]) if self.args else ""

        _RequestRefused = RequestRefused
    return _RequestRefused


_RequestRefused: type[ConfigError] | None = None


def _wrap_validate_params() -> None:
    from vllm.v1.engine.input_processor import InputProcessor

    orig = InputProcessor._validate_params
    if getattr(orig, "_kvpolicy", False):
        return

    @wraps(orig)
    def _validate_params(self: Any, params: Any, *args: Any, **kwargs: Any) -> Any:
        extra = getattr(params, "extra_args", None) or {}
        if CONFIG_KEY in extra:
            try:
                check_request(self.vllm_config, params)
            except ConfigError as err:
                raise refused_request_error()(str(err)) from None
        return orig(self, params, *args, **kwargs)

    _validate_params._kvpolicy = True  # type: ignore[attr-defined]
    InputProcessor._validate_params = _validate_params  # type: ignore[method-assign]


def check_request(vllm_config: Any, params: Any) -> ServeConfig:
    """A request's kvpolicy settings, refused with kvpolicy's message if they cannot be served."""
    default = engine_settings(vllm_config)
    if default is None:
        raise ConfigError(
            f"SamplingParams.extra_args[{CONFIG_KEY!r}]: this engine was started without kvpolicy; start it with "
            f"additional_config={{'{CONFIG_KEY}': {{'policy': 'snapkv', 'budget': 0.2}}}} (or "
            f"{{'{CONFIG_KEY}': {{'enabled': False}}}} to compress only the requests that ask)")
    settings = request_settings(params, default)
    if settings.enabled:
        servable(settings, n_layers_of(vllm_config), f"SamplingParams.extra_args[{CONFIG_KEY!r}]")
    return settings


def install() -> None:
    """Install every hook whose vLLM module imports (each process loads general plugins)."""
    import vllm

    if not vllm.__version__.startswith("0.32."):
        log.warning("kvpolicy_vllm is built for vLLM 0.32; found %s: not installing its hooks", vllm.__version__)
        return
    _wrap_create_engine_config()
    _wrap_validate_params()
    from kvpolicy_vllm import worker

    worker.install()


__all__ = ["install", "check_engine", "check_request", "engine_settings", "request_settings", "servable",
           "RUNS_INSTEAD"]
